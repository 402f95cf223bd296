"""The settings file a site starts from (``thighnode train --init FILE [--from-bundle BUNDLE]``): a fine-tune
of a bundle on the site's labelled CTs and the node's corrected cases, no phantoms.

The network and preprocessing are the bundle's (so its weights fit) and ``init_weights`` names it; the data
keys hold placeholder folders to replace. :func:`site_settings_text` writes it, ``TrainSettings.from_toml``
reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelkit.train_settings import read_bundle_settings

#: The placeholder folders of the written file: a run that still names one stops at the folder check.
PLACEHOLDER_TRAIN = "/path/to/site/train"
PLACEHOLDER_VAL = "/path/to/site/val"

_TEMPLATE = """\
# Fine-tune of {name} {version} ({bundle}) on this site's labelled CTs.
# Written by `thighnode train --init`. Replace the /path/to/... folders, then:  thighnode train {file}
# Every folder below may hold NIfTI pairs (<case>_ct.nii.gz + <case>_label.nii.gz, or imagesTr/ + labelsTr/)
# or DICOM cases (one sub-folder per case: a CT series and one DICOM-SEG); relative paths are taken from the
# folder you run `thighnode train` in.

# Labelled cases to train on (a list of folders; [] when node_data_dir alone supplies them).
data_dirs = [{train}]
# Labelled cases to choose the best step on (never the cases you will test on). Leave it out to hold out
# val_fraction of the training cases instead.
val_dirs = [{val}]
# The node's data directory ([node] data_dir of its configuration): every radiologist-corrected case under
# <node_data_dir>/corrected/ is used too, split by patient: held_out_fraction of the patients are held out
# (never trained on; their StudyInstanceUIDs go into the bundle for `thighnode model compare`).
# node_data_dir = "/var/lib/thighnode"
held_out_fraction = 0.2

# Start from this bundle's weights; [network] and [preprocess] below are its own (they must stay so).
init_weights = {bundle_path}
output_bundle = "bundles/{out_name}"
checkpoint_dir = "site_training/checkpoints"
bundle_name = "{out_name}"
bundle_version = "0.1.0"
intended_use = {intended_use}

# A short fine-tune from the bundle: a low learning rate, a few hundred steps.
iterations = 500
val_every = 100
lr = 4e-4
warmup_iterations = 20
samples_per_volume = 4
seed = 1
num_threads = 2
precision = "fp32"          # "bf16": ~1.7x faster on CPUs with AMX/AVX-512 BF16 and on recent GPUs
calibrate_volumes = false   # true: fit the per-structure volume factors on val_dirs (+ calibration_dirs)
# calibration_dirs = ["/path/to/site/calibration"]

[network]                   # the architecture of {name} {version}
{network}

[preprocess]                # the model grid and window of {name} {version}
{preprocess}
"""


def _toml_value(value: object) -> str:
    """A TOML scalar or array (the JSON spelling is valid TOML for these)."""
    return json.dumps(value)


def _table(values: dict) -> str:
    return "\n".join(f"{key} = {_toml_value(value)}" for key, value in values.items())


def site_settings_text(bundle: Path, file_name: str = "site.toml") -> str:
    """The settings file for a fine-tune of ``bundle`` (a bundle folder); ValueError when it is none."""
    from pipeline.network import NetworkSettings
    from pipeline.preprocess import PreprocessSettings

    settings = read_bundle_settings(Path(bundle))
    if settings is None:
        raise ValueError(f"--from-bundle {bundle} is not a bundle folder (no configs/metadata.json)")
    network = NetworkSettings.from_dict(settings["network"]).to_dict()
    preprocess = PreprocessSettings.from_dict(settings["preprocess"]).to_dict()
    out_name = "site_model"
    return _TEMPLATE.format(
        name=settings["name"], version=settings["version"], bundle=bundle, file=file_name,
        train=_toml_value(PLACEHOLDER_TRAIN), val=_toml_value(PLACEHOLDER_VAL),
        bundle_path=_toml_value(str(Path(bundle).resolve())), out_name=out_name,
        intended_use=_toml_value(f"Site fine-tune of {settings['name']} {settings['version']} on this site's "
                                 "labelled CTs; the site validates it before any clinical use."),
        network=_table(network), preprocess=_table(preprocess),
    )


def write_site_settings(path: Path, bundle: Path) -> Path:
    """Write :func:`site_settings_text` to ``path``; refuse to overwrite a file (ValueError)."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"--init {path} exists already; not overwritten (name a new file)")
    text = site_settings_text(bundle, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
