"""One file per ONNX lowering of an MoE layer's experts; each fills a `Lowering` (see `base`).

- `base`:         the `Lowering` protocol (name, eligible, experts, translations, schema, body) and `Plan`
- `ort_moe`:      com.microsoft.MoE, ONNX Runtime's fused kernel: eligibility (with the onnxruntime probe),
                  the export-only torch op moeify::topk_moe, translation, schema
- `grouped_ffn`:  moeify.GroupedFFN, sparse dispatch: eligibility, translation of moeify::grouped_ffn,
                  schema, standard-op function body
- `soft_experts`: moeify.SoftExperts, Soft MoE: eligibility, export-only op moeify::export_soft_experts,
                  translation, schema, standard-op function body
- `portable`:     the portable bodies' shared pieces (node builder, ONNX activations, batched experts,
                  function wrapper) and the moeify ops' schema pieces (domain, expert inputs, attributes)
- `traced`:       standard ONNX ops traced from the layer's pure-torch path (activation modules)
"""
