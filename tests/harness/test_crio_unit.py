"""The CRI-O driver's storage reading and laziness verdict, without CRI-O (not in Debian):
``crictl`` stands in as a fake; the storage is laid out as containers/storage lays it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import crio
from harness.cli import UserError
from harness.crio import CrioStorage, CrioTimes, crio_storage
from harness.measure import Runner
from harness.records import Record
from tests.harness.test_laziness import RUNTIME, access, graphroot


def test_crio_storage_reads_its_root_and_layer_store(tmp_path: Path) -> None:
    storage, conf = tmp_path / "storage.conf", tmp_path / "crio.conf"
    assert crio_storage(storage, conf) == CrioStorage(Path("/var/lib/containers/storage"), None)
    storage.write_text(
        '[storage]\ndriver = "overlay"\ngraphroot = "/srv/graph"\n'
        '[storage.options]\nadditionallayerstores = ["/var/lib/stargz-store/store:ref"]\n'
    )
    assert crio_storage(storage, conf) == CrioStorage(
        Path("/srv/graph"), Path("/var/lib/stargz-store/store")
    )
    conf.write_text('[crio]\nroot = "/srv/crio"\n')
    assert crio_storage(storage, conf).graphroot == Path("/srv/crio")
    storage.write_text("[storage\n")
    with pytest.raises(UserError, match=r"storage.conf: cannot read CRI-O's storage"):
        crio_storage(storage, conf)


class _Registry:
    def __init__(self, served: list[SimpleNamespace]) -> None:
        self.served = served

    def log_mark(self) -> int:
        return 0

    def access_log(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(bytes=100, **vars(s)) for s in self.served]


def _measure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, from_store: list[bool], served=()
) -> Record:
    mount = tmp_path / "mnt"
    storage = CrioStorage(graphroot(tmp_path, from_store, mount), mount)
    monkeypatch.setattr(crio, "crio_storage", lambda: storage)

    def measure(self, ref, command, ready, timeout, after_pull=lambda: None, entrypoint=None):
        after_pull()
        return CrioTimes(1.0, 0.1, 0.5, 0.4, True, "ready\n")

    monkeypatch.setattr(crio.CrioDriver, "measure", measure)
    rec = Record(0, "python", "estargz", store="default", image="reg/x:y")
    w = SimpleNamespace(command=(), entrypoint=None, ready="ready", timeout=60)
    return Runner._measure_crio(None, rec, w, _Registry(list(served)))  # type: ignore[arg-type]


def test_a_lazy_pull_through_crio_gets_the_verdict(monkeypatch, tmp_path) -> None:
    rec = _measure(monkeypatch, tmp_path, [True, True, True])
    assert (rec.status, rec.layers_total, rec.layers_from_store) == ("ok", 3, 3)


def test_a_crio_pull_past_the_store_fell_back(monkeypatch, tmp_path) -> None:
    """Before, CRI-O's lazy records were ok with no verdict, whatever CRI-O pulled."""
    rec = _measure(monkeypatch, tmp_path, [True, False, True])
    assert rec.status == "fell-back" and "1 of 3 layers not from the store" in rec.error


def test_a_blob_served_whole_to_crio_fell_back(monkeypatch, tmp_path) -> None:
    whole = access(f"sha256:{'a' * 64}", 200, RUNTIME)
    rec = _measure(monkeypatch, tmp_path, [True, True, True], [whole])
    assert rec.status == "fell-back" and rec.layers_served_whole == 1


def test_a_workloads_command_is_crios_args_and_its_entrypoint_crios_command() -> None:
    """CRI (Kubernetes' names): ``command`` replaces the image's ENTRYPOINT, ``args`` its CMD;
    a workload's ``command`` is the image's CMD, as with podman, so it goes in ``args``."""
    assert crio.cri_command((), None) == {}
    assert crio.cri_command(("-v",), None) == {"args": ["-v"]}
    assert crio.cri_command(("-v",), ("/bin/app",)) == {"command": ["/bin/app"], "args": ["-v"]}
    assert crio.cri_command((), ("/bin/app",)) == {"command": ["/bin/app"]}
    assert crio.cri_command(("/bin/sh", "-c", "x"), ()) == {"command": ["/bin/sh", "-c", "x"]}
    with pytest.raises(RuntimeError, match="nothing to run"):
        crio.cri_command((), ())
