"""The synthetic information-imbalance world: vocabulary, renderer and captions.

Modelled on the controlled setting of Schrodi et al. (ICLR 2025, "Two effects,
one trigger"): an image shows one object with A attributes; a caption names the
object plus k of the A attributes, so k sets how much of the image the caption
says. Everything is drawn procedurally with numpy (no downloads).

    item = sample_item(np.random.default_rng(0), image_size=32)
    pixels = render(item, np.random.default_rng(1), image_size=32, noise_std=0.04)
    caption(item, ["colour", "size"])  # 'a large red circle'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBJECTS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "cross",
    "star",
    "heart",
    "crescent",
)

# name -> RGB in [0, 1]; chosen to be distinct from each other and from the backgrounds.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "cyan": (0.10, 0.90, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
}

SIZES: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.44}  # radius / image side

# name -> centre (x, y) as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.30, 0.30),
    "top right": (0.70, 0.30),
    "bottom left": (0.30, 0.70),
    "bottom right": (0.70, 0.70),
    "centre": (0.50, 0.50),
}

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.04),
    "grey": (0.42, 0.42, 0.42),
    "navy": (0.05, 0.06, 0.35),
    "maroon": (0.38, 0.05, 0.08),
    "olive": (0.30, 0.33, 0.05),
}

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "outlined")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
    "texture": tuple(TEXTURES),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
LABEL_COLUMNS: tuple[str, ...] = ("object", *ATTRIBUTE_NAMES)


@dataclass(frozen=True)
class Item:
    """Ground truth of one image: the object and a value for every attribute."""

    object: str
    colour: str
    size: str
    position: str
    background: str
    texture: str

    def label(self, name: str) -> str:
        return getattr(self, name)


def sample_item(rng: np.random.Generator) -> Item:
    """Draw an object and every attribute uniformly."""
    return Item(
        object=OBJECTS[rng.integers(len(OBJECTS))],
        **{name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()},
    )


# --- captions -----------------------------------------------------------------------------------

_TEXTURE_WORDS = {
    "solid": "solid",
    "striped": "striped",
    "dotted": "dotted",
    "outlined": "outlined",
}


def caption(item: Item, named: list[str] | tuple[str, ...]) -> str:
    """A caption naming the object plus exactly the attributes in ``named``.

    Word order is fixed ("a <size> <colour> <texture> <object> at the <position>
    on a <background> background"), so two captions differ only in what they say.
    """
    words = ["a"]
    if "size" in named:
        words.append(item.size)
    if "colour" in named:
        words.append(item.colour)
    if "texture" in named:
        words.append(_TEXTURE_WORDS[item.texture])
    words.append(item.object)
    if "position" in named:
        words.append(f"at the {item.position}")
    if "background" in named:
        words.append(f"on a {item.background} background")
    return " ".join(words)


def dense_caption(item: Item) -> str:
    """The caption naming every attribute (information-balanced)."""
    return caption(item, ATTRIBUTE_NAMES)


def parse_caption(text: str) -> dict[str, str | None]:
    """Read object and attributes back out of a caption in the world's grammar.

    Values a caption does not name come back as None; words outside the
    vocabulary are ignored. Used to score captioners against ground truth.
    """
    text = " " + " ".join(text.lower().replace(",", " ").replace(".", " ").split()) + " "
    found: dict[str, str | None] = {name: None for name in LABEL_COLUMNS}
    for obj in OBJECTS:
        if f" {obj} " in text:
            found["object"] = obj
            break
    for colour in COLOURS:
        if f" {colour} " in text and f" {colour} background" not in text:
            found["colour"] = colour
            break
    for size in SIZES:
        if f" {size} " in text:
            found["size"] = size
            break
    for texture, word in _TEXTURE_WORDS.items():
        if f" {word} " in text:
            found["texture"] = texture
            break
    for position in POSITIONS:
        if f" at the {position} " in text:
            found["position"] = position
            break
    for background in BACKGROUNDS:
        if f" {background} background" in text:
            found["background"] = background
            break
    return found


# --- rendering ----------------------------------------------------------------------------------

_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        _GRID_CACHE[size] = np.meshgrid(coords, coords)  # x, y in [0, 1]
    return _GRID_CACHE[size]


def _shape_mask(obj: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``obj`` in normalised coordinates (object radius = 1)."""
    au, av = np.abs(u), np.abs(v)
    if obj == "circle":
        return u * u + v * v <= 1.0
    if obj == "square":
        return (au <= 0.8) & (av <= 0.8)
    if obj == "triangle":  # apex up
        return (v <= 0.75) & (v >= -1.0 + 1.75 * au / 0.95) & (au <= 0.95)
    if obj == "diamond":
        return au + av <= 1.0
    if obj == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if obj == "star":
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        return r <= 0.5 + 0.5 * np.abs(np.cos(2.5 * (theta + np.pi / 2)))
    if obj == "heart":
        hu, hv = 1.15 * u, -1.15 * v + 0.2  # image y points down
        return (hu * hu + hv * hv - 1.0) ** 3 - hu * hu * hv**3 <= 0.0
    if obj == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.64)
    raise ValueError(f"unknown object {obj!r}")


def render(
    item: Item, rng: np.random.Generator, image_size: int = 32, noise_std: float = 0.05
) -> np.ndarray:
    """Draw ``item`` as an (H, W, 3) uint8 image with jitter and pixel noise."""
    x, y = _grid(image_size)
    cx, cy = POSITIONS[item.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    radius = SIZES[item.size] * rng.uniform(0.9, 1.1)
    angle = rng.uniform(-0.25, 0.25)  # radians; small so shapes stay recognisable
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    dx, dy = (x - cx - jitter[0]) / radius, (y - cy - jitter[1]) / radius
    u, v = cos_a * dx + sin_a * dy, -sin_a * dx + cos_a * dy
    mask = _shape_mask(item.object, u, v)

    if item.texture == "striped":
        mask = mask & ((np.floor((x + y) * image_size / 3.0) % 2) == 0)
    elif item.texture == "dotted":
        cell_x = np.floor(x * image_size) % 2
        cell_y = np.floor(y * image_size) % 2
        mask = mask & (cell_x == 0) & (cell_y == 0)
    elif item.texture == "outlined":
        inner = _shape_mask(item.object, u * 1.45, v * 1.45)
        mask = mask & ~inner

    background = np.asarray(BACKGROUNDS[item.background], dtype=np.float32)
    colour = np.asarray(COLOURS[item.colour], dtype=np.float32)
    colour = np.clip(colour + rng.normal(0.0, 0.03, size=3), 0.0, 1.0)
    image = np.empty((image_size, image_size, 3), dtype=np.float32)
    image[:] = background
    image[mask] = colour
    image += noise_std * rng.standard_normal(size=image.shape, dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def object_mask(item: Item, image: np.ndarray) -> np.ndarray:
    """Pixels closer to the item's colour than to its background (for label checks)."""
    pixels = image.astype(np.float32) / 255.0
    to_colour = np.linalg.norm(pixels - np.asarray(COLOURS[item.colour]), axis=-1)
    to_background = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[item.background]), axis=-1)
    return to_colour < to_background


def dominant_colour(image: np.ndarray, background: str) -> str:
    """The vocabulary colour most pixels that are not background are closest to."""
    pixels = image.reshape(-1, 3).astype(np.float32) / 255.0
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    foreground = pixels[np.linalg.norm(pixels - bg, axis=-1) > 0.3]
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], dtype=np.float32)
    if len(foreground) == 0:
        raise ValueError("image has no foreground pixels")
    nearest = np.argmin(
        np.linalg.norm(foreground[:, None, :] - palette[None, :, :], axis=-1), axis=1
    )
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]
