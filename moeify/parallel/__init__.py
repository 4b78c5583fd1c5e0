"""Expert parallelism over torch.distributed.

- `parallelize(model, ep_group=..., dp_mesh=None, dp="ddp")`: shard the experts, data-parallelise the rest;
  `ep_mesh=` a ('dp', 'ep') mesh for experts replicated over data-parallel groups, or with `bilevel=True`
  a ('node', 'local') mesh for a two-stage (node, then local) exchange.
- `shard_experts`, `ExpertParallel`: the lower-level pieces (the `MoELayer.expert_parallel` hook).
- `CommTimer`: time and traffic (bytes, messages, the part crossing nodes) of the exchanges.
- `save_checkpoint` / `load_checkpoint`: DCP checkpoints that reshard across group sizes.
- `expert_parameters`: the parameters data parallelism must not touch.
- `clip_grad_norm_`: gradient clipping across sharded and replicated parameters.
"""

from moeify.parallel.api import parallelize
from moeify.parallel.checkpoint import load_checkpoint, save_checkpoint
from moeify.parallel.comm import CommTimer, all_to_all
from moeify.parallel.errors import ParallelError
from moeify.parallel.expert import ExpertParallel
from moeify.parallel.grad import clip_grad_norm_
from moeify.parallel.shard import expert_parameters, shard_experts

__all__ = [
    "CommTimer",
    "ExpertParallel",
    "ParallelError",
    "all_to_all",
    "clip_grad_norm_",
    "expert_parameters",
    "load_checkpoint",
    "parallelize",
    "save_checkpoint",
    "shard_experts",
]
