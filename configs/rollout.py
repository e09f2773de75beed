"""Rollout job: roll a checkpoint out on Well files, write predictions, metrics and pictures.

    python -m walrus_jax.main --config configs/rollout.py --config.checkpoint=DIR \
        --config.data=FILE_OR_DIR --workdir OUT

`checkpoint`: a hub repository (`polymathic-ai/walrus_ft_CE-RM`, `hf://ORG/NAME@REVISION`: downloaded
and converted once), a folder in the released layout, a converted release (tools.convert_torch_ckpt
output) or a walrus_jax training workdir (its newest checkpoint); with `adapters` (a LoRA fine-tuning workdir or its exported delta) the base
`checkpoint` plus those adapters. `data`: one Well HDF5 file, a directory of them, or a dataset root with
`split`. Outputs under the workdir: predictions/<dataset>/traj_<j>.hdf5 (Well layout: the input
history followed by the predicted frames), metrics.json, plots/ (PNG panels, GIF, VRMSE vs step).
`--config.ensemble.members=E` rolls out an ensemble and adds its calibration to metrics.json.
Variants: "" (released settings: 6 input frames) or "tiny" (tests: 4 input frames, 3 steps).
"""
from ml_collections import config_dict


def get_config(variant: str = ""):
    c = config_dict.ConfigDict()
    c.mode = "rollout"  # read by walrus_jax.main when --mode is not given
    c.name = "rollout"
    c.checkpoint = ""  # required: hub repository, converted release directory or training workdir
    c.adapters = ""  # LoRA workdir or exported adapter delta trained on `checkpoint` (walrus_jax/checkpoints/adapters.py)
    c.data = ""  # required: Well file, directory of files, or dataset root (with split)
    c.split = ""  # '' = `data` holds the files; else read data/<split>
    c.field_transforms = ""  # "density:log10,temperature:log10" (the release's per-dataset transforms)
    c.trajectories = ()  # trajectory indices to roll out; () = the first max_trajectories
    c.max_trajectories = 4
    c.start_index = 0  # first frame of the input window within each trajectory
    c.n_input_steps = 6  # history length T_in (the release: 6 for 2D, 3 for 3D data)
    c.max_rollout_steps = 200  # steps per trajectory (fewer if the trajectory ends first)
    c.batch_size = 1  # trajectories rolled out together (same dataset, same shape)
    c.chunk_size = 50  # steps per compiled scan; each chunk is copied to host memory
    c.jitter = False  # the released model jitters even in eval; True draws it per step from `seed`
    c.seed = 0
    c.dtype = "float32"  # "bfloat16": bf16 parameters and matmuls (float32 statistics and softmax)
    c.eps = 1e-5  # normalization epsilon (the original's model_epsilon)
    # '' = each window normalized by its own RMS (pretrained models); a dataset folder or stats.yaml =
    # the dataset's global rms / rms_delta (a model fine-tuned with data.normalization='global')
    c.normalization_stats = ""
    c.windows = ((1, 1), (1, 20), (21, 60))  # horizon windows (1-based, inclusive) in metrics.json
    c.plot = True
    c.plot_steps = (1, 10, 50)  # 1-based steps shown in the PNG panels (clipped to the rollout)
    c.animation = "gif"  # "gif" | "mp4" (needs ffmpeg) | "" (none)
    c.write_predictions = True
    # An ensemble of members > 1 rollouts per trajectory, vmapped in one program: members differ by
    # their jitter (ensemble.jitter) and/or a perturbed initial condition (ensemble.perturbation, a
    # fraction of each channel's RMS). The predictions and the metrics are the ensemble mean's;
    # metrics.json adds CRPS, spread-skill and rank histograms per field and horizon window.
    c.ensemble = config_dict.ConfigDict({"members": 0, "jitter": True, "perturbation": 0.0})
    c.on_nonfinite = "error"  # a NaN/Inf prediction: "error" (fail, naming it) | "truncate" (keep the steps before it)
    if variant == "tiny":
        c.n_input_steps = 4
        c.max_rollout_steps = 3
        c.max_trajectories = 2
        c.batch_size = 2
        c.chunk_size = 2
        c.plot_steps = (1, 3)
    elif variant:
        raise ValueError(f"configs/rollout.py: unknown variant {variant!r} (expected '' or 'tiny')")
    return c
