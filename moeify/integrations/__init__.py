"""moeify inside other people's training tools.

- `moeify.integrations.aux_loss`: a forward hook that adds the routers' auxiliary losses to the model's
  returned `loss` while training (installed by `convert`): any loop calling `loss.backward()` trains them.
- `moeify.integrations.transformers`: `RoutingCallback`, a Hugging Face `TrainerCallback` that logs routing
  statistics and writes the expert-load heatmap at each checkpoint (imports transformers on use only).
"""
