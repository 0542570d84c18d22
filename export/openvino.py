"""OpenVINO IR from an ONNX file: openvino.convert_model then openvino.save_model, written atomically (the .xml and
its .bin appear together or not at all). Q/DQ pairs become FakeQuantize; weights keep their integer form
(compress_to_fp16 is off so float weights are not silently halved).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def save_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    with tempfile.TemporaryDirectory(prefix="deploy-ov-", dir=xml_path.parent) as tmp:
        tmp_xml = Path(tmp) / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    return xml_path
