"""scp.ae: the AE built from the config (no network)."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import JPEGLSLossless, RLELossless

from scp.ae import CT_STUDY_SOP_CLASSES, TRANSFER_SYNTAXES, build_ae, storage_sop_classes
from scp.types import IngressConfig


def _config(tmp_path: Path, **overrides: object) -> IngressConfig:
    values: dict[str, object] = {
        "ae_title": "THIGHNODE",
        "host": "127.0.0.1",
        "port": 104,
        "spool_dir": tmp_path,
        "db_path": tmp_path / "db",
    }
    values.update(overrides)
    return IngressConfig(**values)  # type: ignore[arg-type]


def test_supports_every_ct_study_sop_class_with_every_transfer_syntax(tmp_path: Path) -> None:
    ae = build_ae(_config(tmp_path))
    supported = {cx.abstract_syntax: cx.transfer_syntax for cx in ae.supported_contexts}
    assert len(supported) > 128  # more than one association may propose: fine for an acceptor
    for sop_class in (*CT_STUDY_SOP_CLASSES, *storage_sop_classes()):
        assert supported[sop_class] == list(TRANSFER_SYNTAXES), sop_class
    assert "1.2.840.10008.1.1" in supported  # Verification
    assert JPEGLSLossless in TRANSFER_SYNTAXES and RLELossless in TRANSFER_SYNTAXES


def test_settings_come_from_the_config(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        allowed_calling_aets=("CT1", "PACS"),
        acse_timeout_s=11,
        dimse_timeout_s=12,
        network_timeout_s=13,
        maximum_pdu_size=65536,
        maximum_associations=3,
    )
    ae = build_ae(config)
    assert ae.ae_title == "THIGHNODE"
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (11.0, 12.0, 13.0)
    assert ae.maximum_pdu_size == 65536
    assert ae.maximum_associations == 3
    assert ae.require_called_aet is True
    assert ae.require_calling_aet == ["CT1", "PACS"]
    assert build_ae(_config(tmp_path)).require_calling_aet == []
