"""The embedded default captioner: a small conv encoder + GPT-2 VisionEncoderDecoder, its tokenizer.

Everything is built from configs (no downloads): a word-level tokenizer over the
synthetic world's vocabulary (``capgap/core/world.py``) wrapped in
``PreTrainedTokenizerFast``, a ``ViTImageProcessor``, and a
``VisionEncoderDecoderModel`` whose encoder is a small timm XCiT (through
transformers' ``TimmWrapperModel``; any other timm token model, a plain ViT or
Swin on request) and whose decoder is a small GPT-2 with cross-attention.
``save_captioner`` writes all three with ``save_pretrained`` (plus a
``TrOCRProcessor`` config tying image processor and tokenizer together), so the
result loads through the same Auto-class code path as any Hugging Face captioner
(``capgap.models.captioner.HFCaptioner``).

    tok = build_tokenizer()
    model = build_model(TinyCaptionerSpec(), tok)
    save_captioner(model, tok, build_image_processor(32), "runs/captioner")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from capgap.core import world

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
# Words of the caption grammar that are not object or attribute values.
GRAMMAR_WORDS: tuple[str, ...] = ("a", "an", "at", "the", "on", "background", "of", "with", "and")


ENCODERS: tuple[str, ...] = ("timm", "vit", "swin")


def _xcit_args() -> dict:
    # XCiT (El-Nouby et al. 2021), shrunk: a stem of three stride-2 3x3 convolutions (patch 8:
    # 4x4 tokens at 32 px), then blocks of cross-covariance attention with a depthwise-conv
    # local patch interaction, and one class-attention layer; the output is the tokens plus
    # the class token (3-D, as VisionEncoderDecoder needs), at the images' own 32 px.
    return {"img_size": 32, "depth": 3, "embed_dim": 96, "num_heads": 4, "cls_attn_layers": 1}


@dataclass
class TinyCaptionerSpec:
    """Sizes of the embedded captioner (a few hundred thousand parameters; CPU minutes).

    ``encoder``:

    - ``timm`` (default): any timm architecture whose ``forward_features`` returns tokens
      (B, N, C), built by transformers' ``TimmWrapperModel`` from ``timm_architecture``
      and the constructor kwargs ``timm_args`` (``encoder_*`` / ``patch_size`` are unused).
      The default is a small XCiT: its convolutional stem and local patch interaction give
      the locality that shape recognition at 32 px needs; it loads wherever transformers and
      timm are installed. ``efficientformer_l1`` also works (56 px: timm fixes its attention
      bias at 7x7 tokens, so 32 px images are resized up; 4.7x the encoder compute).
    - ``vit``: plain ViT (``encoder_layers`` blocks of width ``encoder_hidden``).
    - ``swin``: windowed attention, hierarchical (``swin_depths`` blocks per stage, width
      ``encoder_hidden`` and ``encoder_heads`` doubling per stage).

    Object accuracy on held-out images: ViT patch 8 (4,000 seed rows, 20 epochs) 0.31; Swin
    patch 2 (4,000 x 15) 0.36; EfficientFormer at 56 px 0.57 on 4,000 x 8 and 0.949 on
    12,000 x 5 (412 s); the default XCiT 0.936 on 12,000 x 5 (every attribute >= 0.988;
    220 s at one thread). Attention alone lacks locality; data matters too.
    """

    encoder: str = "timm"
    image_size: int = 32
    timm_architecture: str = "xcit_nano_12_p8_224"
    timm_args: dict = field(default_factory=_xcit_args)
    patch_size: int = 8
    encoder_hidden: int = 96
    encoder_layers: int = 3
    encoder_heads: int = 4
    encoder_mlp: int = 192
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    swin_window: int = 4
    decoder_hidden: int = 96
    decoder_layers: int = 2
    decoder_heads: int = 4
    max_length: int = 24
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder != "timm" and self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.encoder_hidden % self.encoder_heads or self.decoder_hidden % self.decoder_heads:
            raise ValueError("hidden sizes must be multiples of the head counts")
        if self.max_length < 16:
            raise ValueError("max_length must be >= 16 (a dense caption has 13 words)")


def world_vocabulary() -> list[str]:
    """Special tokens, then every word the synthetic world's captions can contain (stable order)."""
    words: list[str] = []
    values = [*world.OBJECTS, *(v for vals in world.ATTRIBUTES.values() for v in vals)]
    for text in [*GRAMMAR_WORDS, *values]:
        for word in text.split():
            if word not in words:
                words.append(word)
    return [*SPECIAL_TOKENS, *words]


def build_tokenizer(vocabulary: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, whitespace/punctuation split).

    Encoding adds no special tokens; the model's ``decoder_start_token_id`` is
    ``[BOS]`` and training appends ``[EOS]``.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary or world_vocabulary()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary lacks special tokens {missing}")
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=64,
        padding_side="right",
    )


def build_image_processor(image_size: int):
    """Resize to ``image_size`` and scale pixels to [-1, 1] (what the encoder was trained on)."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # bicubic; a no-op at the native size
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def timm_encoder_config(spec: TinyCaptionerSpec):
    """A ``TimmWrapperConfig`` for ``spec.timm_architecture`` sized by ``spec.timm_args``."""
    import timm
    from transformers import TimmWrapperConfig

    args = dict(spec.timm_args)
    probe = timm.create_model(spec.timm_architecture, pretrained=False, num_classes=0, **args)
    config = TimmWrapperConfig(
        architecture=spec.timm_architecture,
        model_args=args,
        do_pooling=False,  # the decoder cross-attends to every token, not a pooled vector
    )
    # VisionEncoderDecoder sizes its encoder->decoder projection from encoder.hidden_size,
    # which TimmWrapperConfig does not define; it is saved with the config.
    config.hidden_size = int(probe.num_features)
    return config


def build_model(spec: TinyCaptionerSpec, tokenizer):
    """A randomly initialised encoder -> GPT-2 ``VisionEncoderDecoderModel`` sized by ``spec``."""
    from transformers import (
        GPT2Config,
        SwinConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    if spec.encoder == "timm":
        encoder = timm_encoder_config(spec)
    elif spec.encoder == "swin":
        encoder = SwinConfig(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            num_channels=3,
            embed_dim=spec.encoder_hidden,
            depths=list(spec.swin_depths),
            num_heads=[spec.encoder_heads * 2**i for i in range(len(spec.swin_depths))],
            window_size=spec.swin_window,
            mlp_ratio=spec.encoder_mlp / spec.encoder_hidden,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
            drop_path_rate=0.0,
        )
    else:
        encoder = ViTConfig(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            num_channels=3,
            hidden_size=spec.encoder_hidden,
            num_hidden_layers=spec.encoder_layers,
            num_attention_heads=spec.encoder_heads,
            intermediate_size=spec.encoder_mlp,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
        )
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(64, spec.max_length),
        n_embd=spec.decoder_hidden,
        n_layer=spec.decoder_layers,
        n_head=spec.decoder_heads,
        n_inner=4 * spec.decoder_hidden,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        is_decoder=True,
        add_cross_attention=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.vocab_size = len(tokenizer)
    model = VisionEncoderDecoderModel(config=config)
    gen = model.generation_config
    gen.decoder_start_token_id = tokenizer.bos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.max_new_tokens = spec.max_length
    gen.num_beams = 1
    gen.do_sample = False
    return model


def build_processor(image_processor, tokenizer):
    """Tie image processor and tokenizer into one processor (TrOCR's, made for ViT encoders)."""
    from transformers import TrOCRProcessor

    return TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_captioner(model, tokenizer, image_processor, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` model, tokenizer, image processor and processor into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(image_processor, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out
