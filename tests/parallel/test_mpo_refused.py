"""MPO experts are not expert-parallel yet: `shard_experts` refuses them with a message naming the way out."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import datetime, sys, torch.distributed as dist
    import moeify
    from moeify.parallel import ParallelError
    from moeify.parallel.shard import shard_experts
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    layer = moeify.MoELayer(moeify.MoEConfig(d_model=8, d_ff=12, num_experts=4, expert_param="mpo"))
    try:
        shard_experts(layer)
    except ParallelError as exc:
        print("refused:", exc)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_shard_experts_refuses_mpo_experts(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "MPO experts" in proc.stdout and "expert_param='dense'" in proc.stdout
