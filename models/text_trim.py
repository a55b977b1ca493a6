"""open_clip's CLIP with its text tower run only over the token positions a batch uses.

The tokenizer pads every caption to the context length (77 for ViT-B/32, 20 for the
capgap micro models), yet with a causal attention mask no position sees a later one, and
the pooled feature is taken at each row's end-of-text token (``argmax`` pooling: the EOT
id is the largest). Positions after the batch's last EOT cannot change any output or
gradient, so :class:`TrimmedTextCLIP` cuts them (with the positional embedding and the
mask) before the transformer: the same features, less work in proportion to how short
the batch's captions are ("a star" is 4 of 20 positions). Models whose text tower is not
causal, or pools otherwise, keep open_clip's ``encode_text`` unchanged.

One long caption would still make the whole batch run to its length, so a batch also
runs in groups of similar length when the positions saved pay for another forward pass
(:mod:`capgap.models.text_groups`, which the transformers CLIP scorer uses too).

    model = trim_text_padding(open_clip.create_model("ViT-B-32"))   # create_clip does this
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from capgap.models.text_groups import encode_in_length_groups, group_overhead


class TrimmedTextCLIP(open_clip.CLIP):
    """:class:`open_clip.CLIP` whose ``encode_text`` skips the padding after each row's EOT."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if not text.numel():
            return super().encode_text(text, normalize=normalize)
        lengths = (text.argmax(dim=-1) + 1).tolist()
        if min(lengths) >= text.shape[-1]:
            return super().encode_text(text, normalize=normalize)
        overhead = group_overhead(self.transformer.width, text.device)
        x = encode_in_length_groups(self._encode_positions, text, lengths, overhead)
        return F.normalize(x, dim=-1) if normalize else x

    def _encode_positions(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text over the first ``text.shape[-1]`` positions."""
        used = text.shape[-1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[:used].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:used, :used])
        x = self.ln_final(x)
        x = text_global_pool(x, text, self.text_pool_type)
        if self.text_projection is not None:
            if isinstance(self.text_projection, torch.nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x


def trim_text_padding(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as a :class:`TrimmedTextCLIP` when trimming cannot change its outputs
    (a plain open_clip ``CLIP`` with a causal text mask and ``argmax`` pooling); any other
    model is returned as it is. The weights, state-dict keys and modules stay the same."""
    if (
        type(model) is open_clip.CLIP
        and getattr(model, "attn_mask", None) is not None
        and model.text_pool_type == "argmax"
    ):
        model.__class__ = TrimmedTextCLIP
    return model
