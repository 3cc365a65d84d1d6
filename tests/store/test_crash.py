"""Fault injection on the store: a process killed in the middle of an upload."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from service.store.store import AdapterStore


def test_process_killed_mid_upload_leaves_no_adapter_and_sweep_cleans(tmp_path: Path,
                                                                      tiny_adapters: dict[str, Path]) -> None:
    store_root = tmp_path / "store"
    shutil.copytree(tiny_adapters["lora-gen"], store_root / "existing")
    script = textwrap.dedent(f"""
        import io, zipfile, pathlib, time
        from service.store.store import AdapterStore
        from service.store.archive import ArchiveLimits, unpack
        store = AdapterStore(pathlib.Path({str(store_root)!r}))
        source = pathlib.Path({str(tiny_adapters["lora-gen"])!r})
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as bundle:
            bundle.writestr("adapter_config.json", (source / "adapter_config.json").read_bytes())
            bundle.writestr("adapter_model.safetensors", (source / "adapter_model.safetensors").read_bytes() * 400)
        staged = store.staging_folder()
        print("staging", flush=True)
        while True:  # keep writing until killed, as a slow upload would
            buffer.seek(0)
            for entry in staged.iterdir():
                entry.unlink()
            unpack(buffer, len(buffer.getvalue()), staged, ArchiveLimits())
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
    assert process.stdout.readline().strip() == "staging"
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    store = AdapterStore(store_root)
    assert store.names() == ["existing"]  # the half-written upload never shows as an adapter
    assert any(p.name.startswith(".staging-") for p in store_root.iterdir())
    store.sweep()
    assert sorted(p.name for p in store_root.iterdir()) == ["existing"]
    assert store.get("existing").name == "existing"
