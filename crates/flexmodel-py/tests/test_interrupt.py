"""Ctrl-C during a harvest ends it with KeyboardInterrupt, its complete shards kept; resumed, it
equals a harvest that ran through."""

import json
import signal
import subprocess
import sys
import time

import numpy as np

import flexmodel
from conftest import ROOT, TINY

# Every batch waits in an editing function, so that the harvest is slow enough to interrupt.
SCRIPT = """
import sys, time, flexmodel
fm = flexmodel.load(sys.argv[1])
fm.register_forward_hook(flexmodel.HookFunction(
    "model.layers.0", editing_function=lambda x, c: time.sleep(0.05), capture=False))
flexmodel.harvest(fm, sys.argv[2], ["model.layers.1"], sys.argv[3], **OPTIONS)
"""
OPTIONS = dict(seq_len=12, batch_size=4, shard_tokens=60)


def test_ctrl_c_keeps_a_resumable_harvest(tmp_path):
    lines = (ROOT / "data" / "tiny.txt").read_text().splitlines() * 5
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "interrupted"
    script = SCRIPT.replace("**OPTIONS", "**" + repr(OPTIONS))
    proc = subprocess.Popen([sys.executable, "-c", script, str(TINY), str(data), str(out)],
                            stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 0 < len(state["shards"])
    assert state["shards"][-1]["rows"][1] < len(lines)

    flexmodel.harvest(TINY, data, ["model.layers.1"], out, resume=True, **OPTIONS)
    whole = tmp_path / "whole"
    flexmodel.harvest(TINY, data, ["model.layers.1"], whole, **OPTIONS)
    resumed, straight = flexmodel.read_harvest(out), flexmodel.read_harvest(whole)
    assert resumed.complete
    for name in straight.names:
        np.testing.assert_array_equal(resumed[name], straight[name])
