"""The HF captioner backend on tiny real architectures built from configs (no downloads).

Each model (VisionEncoderDecoder = the embedded default, BLIP, LLaVA with a chat
template) is made tiny, overfitted for a few steps so that two images get two
different known captions, saved with ``save_pretrained`` and loaded back
through ``load_captioner``: a wiring mistake (wrong image order, prompt left in
the output, wrong padding side) changes the captions and fails the test.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capgap.core import world
from capgap.models import tiny_captioner as tc
from capgap.models.captioner import (
    CaptionerConfig,
    fingerprint_dir,
    load_captioner,
    pick_auto_class,
)
from capgap.pipeline import synth

CAPTIONS = ("a red circle", "a blue square")
WORDS = [
    "a",
    "an",
    "the",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "on",
    "at",
    "of",
    "picture",
    "photo",
    "describe",
    "this",
    "image",
]
LLAVA_PROMPT = "describe this image"


def two_images() -> list[Image.Image]:
    """A red and a blue image (noise keeps them from being trivially constant)."""
    rng = np.random.default_rng(0)
    out = []
    for rgb in ((220, 30, 30), (30, 40, 220)):
        pixels = np.clip(np.asarray(rgb) + rng.normal(0, 8, (32, 32, 3)), 0, 255)
        out.append(Image.fromarray(pixels.astype(np.uint8)))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _overfit(model, batches, steps: int = 80, lr: float = 1e-2) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batches).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


TINY_TIMM_ARGS = {"img_size": 32, "depth": 1, "embed_dim": 16, "num_heads": 2, "cls_attn_layers": 1}


def make_ved_dir(path: Path, encoder: str = "vit") -> Path:
    """The embedded captioner architecture (tiny sizes), taught CAPTIONS, saved as HF."""
    torch.manual_seed(0)
    tok = tc.build_tokenizer()
    spec = tc.TinyCaptionerSpec(
        encoder=encoder, patch_size=8 if encoder == "vit" else 4, swin_depths=[1, 1],
        encoder_hidden=32, encoder_layers=1, encoder_heads=2, encoder_mlp=64,
        decoder_hidden=32, decoder_layers=1, decoder_heads=2, max_length=16,
        image_size=32, timm_args=TINY_TIMM_ARGS,
    )  # fmt: skip
    model = tc.build_model(spec, tok)
    image_processor = tc.build_image_processor(spec.image_size)
    pixels = image_processor(two_images(), return_tensors="pt")["pixel_values"]
    ids = [tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for c in CAPTIONS]
    labels = torch.tensor(ids)
    _overfit(model, {"pixel_values": pixels, "labels": labels})
    tc.save_captioner(model, tok, image_processor, path)
    return path


def make_blip_dir(path: Path, prompt: str = "") -> Path:
    """BlipForConditionalGeneration + BlipProcessor with a tiny word-piece vocabulary."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = BlipConfig(
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={
            **small,
            "num_attention_heads": 2,
            "vocab_size": len(tok),
            "max_position_embeddings": 32,
            "encoder_hidden_size": 32,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
            "sep_token_id": tok.sep_token_id,
        },
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    texts = [f"{prompt} {c}".strip() for c in CAPTIONS]
    batch = processor(images=two_images(), text=texts, return_tensors="pt", padding=True)
    input_ids = batch["input_ids"].clone()
    input_ids[:, 0] = tok.bos_token_id  # BLIP's decoder starts from [DEC] when generating
    labels = input_ids.masked_fill(batch["attention_mask"] == 0, -100)
    _overfit(
        model,
        {
            "pixel_values": batch["pixel_values"],
            "input_ids": input_ids,
            "attention_mask": batch["attention_mask"],
            "labels": labels,
        },
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_llava_dir(path: Path) -> Path:
    """LlavaForConditionalGeneration (CLIP vision + Llama text) with a chat template."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    vocab = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", *WORDS]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),
        image_token_index=vocab.index("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LLAVA_PROMPT}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    texts = [f"{prompt}{c} </s>" for c in CAPTIONS]
    batch = processor(images=[[im] for im in two_images()], text=texts, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == config.image_token_index, -100)
    _overfit(model, {**batch, "labels": labels})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on shared cores they only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory) -> Path:
    return make_ved_dir(tmp_path_factory.mktemp("ved"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return make_blip_dir(tmp_path_factory.mktemp("blip"), prompt="a picture of")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return make_llava_dir(tmp_path_factory.mktemp("llava"))


def _expected(order: list[int]) -> list[str]:
    return [CAPTIONS[i] for i in order]


# --- tokenizer and embedded model ---------------------------------------------------------------


def test_world_tokenizer_round_trips_every_dense_caption():
    tok = tc.build_tokenizer()
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = world.dense_caption(world.sample_item(rng))
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok("a purple blob", add_special_tokens=False).input_ids[1] == tok.unk_token_id


def test_embedded_dir_is_plain_hf_format(ved_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    names = set(os.listdir(ved_dir))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    } <= names
    assert type(AutoProcessor.from_pretrained(ved_dir)).__name__ == "TrOCRProcessor"
    model = AutoModelForImageTextToText.from_pretrained(ved_dir)
    assert type(model).__name__ == "VisionEncoderDecoderModel"


def test_vision_encoder_decoder_through_hf_backend(ved_dir):
    images = two_images()
    captioner = load_captioner(CaptionerConfig(model=str(ved_dir), batch_size=2))
    order = [0, 1, 1, 0, 1]
    assert captioner.caption([images[i] for i in order]) == _expected(order)
    assert captioner.source == f"{ved_dir}@{fingerprint_dir(ved_dir)}"


def test_swin_encoder_variant_through_hf_backend(tmp_path):
    swin_dir = make_ved_dir(tmp_path / "swin", encoder="swin")
    captioner = load_captioner(CaptionerConfig(model=str(swin_dir)))
    assert type(captioner.model.encoder).__name__ == "SwinModel"
    assert captioner.caption(two_images()[::-1]) == list(CAPTIONS[::-1])


def test_timm_encoder_variant_through_hf_backend(tmp_path):
    """The default encoder: a timm XCiT inside transformers' TimmWrapperModel."""
    timm_dir = make_ved_dir(tmp_path / "timm", encoder="timm")
    config = json.loads((timm_dir / "config.json").read_text())
    assert config["encoder"]["architecture"] == "xcit_nano_12_p8_224"
    assert config["encoder"]["hidden_size"] == 16
    captioner = load_captioner(CaptionerConfig(model=str(timm_dir)))
    assert type(captioner.model.encoder).__name__ == "TimmWrapperModel"
    assert captioner.caption(two_images()[::-1]) == list(CAPTIONS[::-1])


def test_embedded_dir_without_processor_config_loads_parts(ved_dir, tmp_path):
    """A VisionEncoderDecoder saved without processor_config.json (common on the hub)."""
    for name in os.listdir(ved_dir):
        if name != "processor_config.json":
            (tmp_path / name).write_bytes((ved_dir / name).read_bytes())
    captioner = load_captioner(CaptionerConfig(model=str(tmp_path)))
    assert captioner.caption(two_images()) == list(CAPTIONS)


def test_blip_with_prompt_strips_the_echo(blip_dir):
    images = two_images()
    captioner = load_captioner(
        CaptionerConfig(model=str(blip_dir), prompt="a picture of", batch_size=3)
    )
    assert type(captioner.model).__name__ == "BlipForConditionalGeneration"
    order = [1, 0, 0, 1]
    assert captioner.caption([images[i] for i in order]) == _expected(order)
    keep = load_captioner(
        CaptionerConfig(model=str(blip_dir), prompt="a picture of", strip_prompt=False)
    )
    assert keep.caption(images[:1]) == [f"a picture of {CAPTIONS[0]}"]


def test_llava_chat_template_and_left_padding(llava_dir):
    images = two_images()
    cfg = CaptionerConfig(model=str(llava_dir), prompt=LLAVA_PROMPT, max_new_tokens=8, batch_size=4)
    captioner = load_captioner(cfg)
    assert captioner.use_chat and captioner.tokenizer.padding_side == "left"
    order = [0, 1, 1]
    assert captioner.caption([images[i] for i in order]) == _expected(order)


def test_prompt_template_fills_in_the_original_caption(llava_dir):
    captioner = load_captioner(CaptionerConfig(model=str(llava_dir), prompt="describe {caption}"))
    assert captioner._prompt_text("a red circle") == "describe a red circle"
    rendered = captioner._render_prompt(captioner._prompt_text("the photo"))
    assert rendered == "user <image> describe the photo assistant "
    # Prompts of different lengths in one batch still give one caption each.
    out = captioner.caption(two_images(), ["a", "the red photo of a circle"])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


# --- loading rules ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure")
def test_cuda_without_cuda_fails_loudly(ved_dir):
    with pytest.raises(RuntimeError, match="CUDA"):
        load_captioner(CaptionerConfig(model=str(ved_dir), device="cuda"))


def test_remote_code_is_not_run_unless_asked(tmp_path):
    marker = tmp_path / "ran.txt"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "capgap_evil_vlm",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
            }
        )
    )
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'capgap_evil_vlm'\n"
    )
    assert CaptionerConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_captioner(CaptionerConfig(model=str(tmp_path)))
    assert not marker.exists()


def test_pick_auto_class_rejects_text_only_models():
    from transformers import AutoModelForImageTextToText, BertConfig, VisionEncoderDecoderConfig

    ved = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        __import__("transformers").ViTConfig(), __import__("transformers").GPT2Config()
    )
    assert pick_auto_class(ved) is AutoModelForImageTextToText
    with pytest.raises(ValueError, match="no image-to-text Auto class"):
        pick_auto_class(BertConfig())


def test_config_validation_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        CaptionerConfig(dtype="float8")
    with pytest.raises(FileNotFoundError):
        load_captioner(CaptionerConfig(model=str(tmp_path / "nope")))


def test_fingerprint_follows_the_weights(ved_dir, tmp_path):
    for name in os.listdir(ved_dir):
        (tmp_path / name).write_bytes((ved_dir / name).read_bytes())
    assert fingerprint_dir(tmp_path) == fingerprint_dir(ved_dir)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint_dir(tmp_path) != fingerprint_dir(ved_dir)


# --- train-captioner ----------------------------------------------------------------------------


def test_attribute_accuracy_counts_unnamed_values_as_wrong():
    from capgap.pipeline.train_captioner import attribute_accuracy

    item = world.Item("star", "red", "small", "centre", "navy", "dotted")
    labels = {name: [item.label(name)] * 2 for name in world.LABEL_COLUMNS}
    acc = attribute_accuracy([world.dense_caption(item), "a red star"], labels)
    assert acc["object"] == 1.0 and acc["colour"] == 1.0
    assert acc["size"] == 0.5 and acc["texture"] == 0.5 and acc["all"] == 0.5


def _write_split(folder: Path, split: str, n: int) -> Path:
    cfg = synth.SynthConfig()
    rows = [synth.make_row(i, split, cfg.splits[split], 0, 32, 0.05) for i in range(n)]
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=synth.SCHEMA), folder / "part.parquet")
    return folder


def test_train_captioner_saves_a_loadable_hf_model(tmp_path):
    from capgap.core.config import load_config
    from capgap.pipeline.train_captioner import TrainCaptionerConfig, main, train_captioner

    seed = _write_split(tmp_path / "seed", "seed", 48)
    test = _write_split(tmp_path / "test", "test", 16)
    cfg = load_config(
        TrainCaptionerConfig,
        "captioner",
        [
            f"data={seed}",
            f"eval_data={test}",
            f"out={tmp_path / 'cap'}",
            "epochs=1",
            "batch_size=16",
            "warmup_steps=1",
            "progress=false",
            "model.encoder_hidden=32",
            "model.encoder_mlp=64",
            "model.encoder_layers=1",
            "model.decoder_hidden=32",
            "model.decoder_layers=1",
        ],
        section="train",
    )
    out = train_captioner(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_rows"] == 48
    assert set(metrics["accuracy"]) == {*world.LABEL_COLUMNS, "all"}
    assert (out / "train_captioner_config.yaml").is_file()
    captions = load_captioner(CaptionerConfig(model=str(out))).caption(two_images())
    assert len(captions) == 2
    # The CLI resolves the same preset and rejects unknown keys.
    with pytest.raises(SystemExit, match="unknown config key"):
        main(["--set", "nonsense=1"])
