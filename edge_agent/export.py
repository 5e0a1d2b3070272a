"""The device's current model as a standard ``.onnx`` file any local program can load.

After each install the agent writes ``current.onnx`` (an inference graph with the weights inside)
and ``current.json`` (version, input and output names and shapes) to its state directory,
atomically. Needs the ``onnx`` extra; without it the export is skipped with a log line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedmq.broker.files import write_atomic
from fedmq.broker.messages import ModelMessage

log = logging.getLogger(__name__)

ONNX_FILE = "current.onnx"
SIDECAR_FILE = "current.json"


def export_current_model(state_dir: Path, model: ModelMessage, backbone: bytes | None = None) -> Path | None:
    """Write ``current.onnx`` (the backbone, if any, composed with the MLP head into one graph)
    and its JSON sidecar for ``model``; return the model path, or None without onnx installed."""
    try:
        import onnx

        from .onnx_backend import compose_with_backbone, inference_model
    except ImportError as exc:
        log.debug("not exporting current.onnx: %s (pip install 'fedmq[onnx]')", exc)
        return None
    onnx_model = inference_model(model.arch, model.params)
    if backbone is not None:
        onnx_model = compose_with_backbone(onnx.load_from_string(backbone), onnx_model)
    path = Path(state_dir) / ONNX_FILE
    write_atomic(path, onnx_model.SerializeToString())
    write_atomic(Path(state_dir) / SIDECAR_FILE, (json.dumps(sidecar(model, onnx_model), indent=2) + "\n").encode())
    return path


def sidecar(model: ModelMessage, onnx_model: Any) -> dict[str, Any]:
    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out.append({"name": v.name, "shape": dims, "elem_type": int(v.type.tensor_type.elem_type)})
        return out

    return {
        "version": model.version,
        "parent": model.parent,
        "fleet": model.fleet,
        "architecture": model.arch.to_wire(),
        "backbone_sha256": model.backbone.sha256 if model.backbone else None,
        "opset": max(o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": describe(onnx_model.graph.input),
        "outputs": describe(onnx_model.graph.output),
    }
