"""Foundation of capgap, imported by every other layer and importing none of them.

- :mod:`capgap.core.config`: typed configs (dataclasses <- YAML presets <- overrides);
- :mod:`capgap.core.world`: the synthetic world's vocabulary, captions and renderer;
- :mod:`capgap.core.files`: glob / folder patterns -> sorted local files;
- :mod:`capgap.core.images`: encoded image bytes -> RGB PIL image (for data capgap wrote);
- :mod:`capgap.core.device`: a ``torch.device`` from a name, never a silent CPU fallback.

The layers, each importing only those below it (``make lint`` checks this with
import-linter): ``capgap.pipeline`` (commands) -> ``capgap.transforms`` (Beam) ->
``capgap.models`` (torch) -> ``capgap.core``.
"""
