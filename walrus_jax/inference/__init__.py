"""Inference: rollouts.py (compiled autoregressive rollouts), metrics.py (the_well's metrics, the
persistence baseline, the metrics report), evaluation.py (validation during training and
`--mode eval`), rollout_job.py (`--mode rollout`), plotting.py."""
