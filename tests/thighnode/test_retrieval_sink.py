"""A C-GET's instances (prior retrieval and backfill) pass the listener's [security] integrity limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from scp.errors import IngressError
from scp.index import InstanceIndex
from tests.scp.dicom_factory import c_get_part10 as _part10
from tests.scp.test_integrity import _ct
from thighnode.priors import retrieval_sink
from thighnode.settings import load_settings


def test_the_sink_applies_the_configured_element_limit(tmp_path: Path) -> None:
    ds = _ct(sop_uid=generate_uid())
    ds.ImageComments = "x" * 200
    strict = load_settings(environ={"THIGHNODE_HOME": str(tmp_path / "a"), "THIGHNODE_SECURITY__MAX_ELEMENT_BYTES": "64"})
    with InstanceIndex(tmp_path / "a.db") as index:
        with pytest.raises(IngressError, match="is 200 bytes long; allowed: at most max_element_bytes = 64"):
            retrieval_sink(strict, index, "PACS")(_part10(ds))
        assert not index.has(ds.SOPInstanceUID)
    default = load_settings(environ={"THIGHNODE_HOME": str(tmp_path / "b")})
    default.spool_dir.mkdir(parents=True)
    with InstanceIndex(tmp_path / "b.db") as index:
        retrieval_sink(default, index, "PACS")(_part10(ds))
        assert index.has(ds.SOPInstanceUID)
