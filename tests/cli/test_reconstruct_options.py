"""``cryoace reconstruct``'s options are generated from the TrainConfig fields (cryoace.options):
every flag the command had reaches its field, --help shows each default the presets really use, and a
resumed run refuses changed settings but takes a new budget. No training here."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cryoace.cli import reconstruct
from cryoace.errors import CryoaceInputError
from cryoace.options import add_options, apply_options, option, option_fields
from cryoace.train.config import DECODER_NAMES, PRESETS, TrainConfig, preset_config, save_config

# flag, value(s) on the command line, config path, the value the config must hold
FLAGS = [
    ("--seed", ["7"], "seed", 7),
    ("--batch-size", ["8"], "batch_size", 8),
    ("--loss", ["l2"], "loss", "l2"),
    ("--steps", ["12"], "steps", 12),
    ("--epochs", ["1.5"], "epochs", 1.5),
    ("--max-time", ["1h30m"], "max_time_s", 5400.0),
    ("--encoder", ["resnet18"], "encoder.name", "resnet18"),
    ("--pose-heads", ["4"], "encoder.n_heads", 4),
    ("--decoder", ["voxel-real"], "decoder.name", "voxel-real"),
    ("--lr", ["0.01"], "optim.lr", 0.01),
    ("--no-amsgrad", [], "optim.amsgrad", False),
    ("--grad-clip", ["0"], "optim.grad_clip", 0.0),
    ("--optimizer", ["adamw"], "optim.name", "adamw"),
    ("--decoder-lr", ["2"], "optim.decoder_lr", 2.0),
    ("--lr-warmup", ["10"], "optim.warmup_steps", 10),
    ("--lr-milestones", ["100,200"], "optim.milestones", (100, 200)),
    ("--lr-gamma", ["0.5"], "optim.gamma", 0.5),
    ("--band-start", ["0.2"], "band_start_cyc_px", 0.2),
    ("--band-ramp", ["50"], "band_ramp_steps", 50),
    ("--warmup-labels", ["5"], "warmup_label_steps", 5),
    ("--warmup-filter", ["2"], "warmup_label_filter", 2),
    ("--shift-l1", ["0.3"], "shift_l1", 0.3),
    ("--gsym-views", ["4"], "gsym_views", 4),
    ("--force-gsym", [], "force_gsym", True),
    ("--no-pip", [], "pip.enabled", False),
    ("--pip-weight", ["0.5"], "pip.weight", 0.5),
    ("--pip-warmup", ["3"], "pip.warmup_steps", 3),
    ("--pip-mode", ["alternate"], "pip.mode", "alternate"),
    ("--no-pip-freeze-decoder", [], "pip.freeze_decoder", False),
    ("--pip-snr", ["-10"], "pip.snr_db", -10.0),
    ("--pip-shift-sigma", ["2"], "pip.shift_sigma_angst", 2.0),
    ("--refine", [], "refine.enabled", True),
    ("--refine-rounds", ["3"], "refine.rounds", 3),
    ("--refine-max-time", ["90s"], "refine.max_time_s", 90.0),
    ("--refine-step", ["12"], "refine.global_step_deg", 12.0),
    ("--refine-centring", ["0.25"], "refine.centring_radius", 0.25),
    ("--refine-start-resolution", ["15"], "refine.start_resolution_px", 15.0),
    ("--no-ab-initio", [], "refine.ab_initio", False),
    ("--ab-initio-iterations", ["4"], "refine.ab_initio_iterations", 4),
    ("--ab-initio-starts", ["2"], "refine.ab_initio_starts", 2),
    ("--ab-initio-halves", [], "refine.ab_initio_halves", True),
    ("--teach-encoder", ["2m"], "refine.teach_time_s", 120.0),
    ("--refine-subset", ["500"], "refine.subset", 500),
    ("--refine-false-accept", ["0.02"], "refine.false_accept", 0.02),
    ("--halves", [], "halves", True),
    ("--downsample", ["16"], "data.downsample", 16),
    ("--datadir", ["stacks/"], "data.datadir", "stacks"),
    ("--invert-contrast", [], "data.invert_contrast", True),
    ("--no-check-contrast", [], "data.check_contrast", False),
    ("--auto-invert", [], "data.auto_invert", True),
    ("--no-ctf", [], "data.use_ctf", False),
    ("--num-workers", ["2"], "data.num_workers", 2),
    ("--preload", ["ram"], "data.preload", "ram"),
    ("--device", ["cpu"], "device", "cpu"),
    ("--compile", [], "compile", True),
    ("--precision", ["bf16"], "precision", "bf16"),
    ("--channels-last", [], "channels_last", True),
    ("--log-every", ["4"], "log_every", 4),
    ("--checkpoint-every", ["8"], "checkpoint_every", 8),
    ("--volume-every", ["0"], "volume_every", 0),
    ("--eval-every", ["6"], "eval_every", 6),
    ("--no-tensorboard", [], "tensorboard", False),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reconstruct")
    reconstruct.add_args(parser)
    return parser


def _get(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _config(tmp_path, *argv):
    args = _parser().parse_args(["p.star", "-o", str(tmp_path / "run"), *argv])
    return reconstruct.build_config(args)


@pytest.mark.parametrize("flag, values, path, expected", FLAGS, ids=[f[0] for f in FLAGS])
def test_every_flag_reaches_its_config_field(tmp_path, flag, values, path, expected):
    base = preset_config("paper")
    config = _config(tmp_path, "--preset", "paper", flag, *values)
    assert _get(config, path) == expected != _get(base, path)


def test_halves_patience_and_the_preset_defaults(tmp_path):
    config = _config(tmp_path, "--preset", "tiny", "--halves", "--halves-patience", "3")
    assert config.halves_patience == 3
    assert _config(tmp_path, "--preset", "tiny") == preset_config("tiny")  # nothing given: the preset
    with pytest.raises(CryoaceInputError, match="--halves-patience needs --halves"):
        _config(tmp_path, "--preset", "tiny", "--halves-patience", "3")


def test_every_generated_option_is_covered_here():
    flags = {spec.flag for _path, _field, spec, _hint in option_fields(TrainConfig)}
    assert flags == {f[0].replace("--no-amsgrad", "--amsgrad").replace("--no-pip-freeze-decoder",
                                                                        "--pip-freeze-decoder")
                     .replace("--no-ab-initio", "--ab-initio").replace("--no-check-contrast", "--check-contrast")
                     .replace("--no-pip", "--pip")
                     for f in FLAGS} | {"--halves-patience"}


def test_a_budget_option_replaces_the_presets_whole_budget(tmp_path):
    assert preset_config("cpu").max_time_s == 1200
    config = _config(tmp_path, "--preset", "cpu", "--steps", "10")
    assert config.steps == 10 and config.max_time_s is None and config.epochs is None


def test_help_shows_each_default_from_the_presets(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR Adam learning rate (presets: tiny 0.001, cpu 0.001, paper 0.0001)" in text
    assert "--batch-size B images per step (presets: tiny 16, cpu 32, paper 64)" in text
    assert "(presets: tiny none, cpu 20m, paper none)" in text  # --max-time, shown in minutes
    assert "--lr-gamma LR_GAMMA learning-rate factor at each milestone (default: 0.1)" in text
    assert ("--pip-weight LAMBDA weight of the PIP loss (from the data's SNR: ACE-EM's 0.9 noise-free ... 0.07 "
            "at -10 dB) (presets: tiny 0.1, cpu from the data's SNR, paper from the data's SNR)") in text
    assert "more than 1% in N evaluations" in text
    assert "{" + ",".join(DECODER_NAMES) + "}" in text
    assert "tiny, cpu, paper" in text


def test_refine_settings_follow_the_refine_flags(tmp_path):
    """The refinement stage (and ``cryoace refine``, from the run's config) searches with the flags' values."""
    from cryoace.pipeline.refine_stage import stage_settings

    config = _config(tmp_path, "--preset", "tiny", "--refine-false-accept", "0.02", "--refine-centring", "0.2",
                     "--refine-step", "10")
    settings = stage_settings(config)
    assert (settings.max_false_accept, settings.centring_radius, settings.global_step_deg) == (0.02, 0.2, 10.0)


def test_bad_choice_and_bad_duration(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["p.star", "-o", "run", "--decoder", "nerf"])
    assert exit_info.value.code == 2 and "invalid choice: 'nerf'" in capsys.readouterr().err
    with pytest.raises(CryoaceInputError, match="cannot read the duration 'soon'"):
        _config(tmp_path, "--preset", "tiny", "--max-time", "soon")
    with pytest.raises(CryoaceInputError, match="--refine-centring must be between 0 and 0.5"):
        _config(tmp_path, "--preset", "tiny", "--refine-centring", "0.7")
    with pytest.raises(CryoaceInputError, match=r"--refine-false-accept must be a fraction in \[0, 1\)"):
        _config(tmp_path, "--preset", "tiny", "--refine-false-accept", "-0.1")


def test_a_resumed_run_refuses_changed_settings_and_takes_a_budget(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = preset_config("tiny")
    saved.data.use_ctf = True
    save_config(run / "config.yaml", saved)
    config = _config(tmp_path, "--resume", "--steps", "80", "--device", "cpu", "--lr", "0.001",
                     "--no-check-contrast")
    assert config.steps == 80 and config.device == "cpu" and config.optim.lr == 1e-3
    assert config.data.check_contrast is True  # only a new run reads it
    with pytest.raises(CryoaceInputError, match="--lr 0.01 differs from the run's 0.001; a resumed run"):
        _config(tmp_path, "--resume", "--lr", "0.01")
    with pytest.raises(CryoaceInputError, match="--no-ctf differs from the run's setting"):
        _config(tmp_path, "--resume", "--no-ctf")
    with pytest.raises(CryoaceInputError, match="--preset paper differs from the run's tiny"):
        _config(tmp_path, "--resume", "--preset", "paper")


def test_options_of_a_small_dataclass():
    """The generator on its own: help defaults, kinds, together sets, resume rules."""

    @dataclasses.dataclass
    class Settings:
        size: int = option(3, flag="--size", group="g", help="a size")
        fast: bool = option(False, flag="--fast", group="g", kind="on", on_resume="free", help="go fast")
        colour: bool = option(True, flag="--no-colour", group="g", kind="off", help="no colour")
        a: int | None = option(None, flag="--a", group="g", together="t", on_resume="free", help="a")
        b: int | None = option(5, flag="--b", group="g", together="t", on_resume="free", help="b")
        plain: int = 1

    parser = argparse.ArgumentParser()
    add_options(parser, Settings, {"g": "group"})
    assert "a size (default: 3)" in " ".join(parser.format_help().split())
    args = parser.parse_args(["--a", "2", "--no-colour", "--fast"])
    settings = Settings()
    apply_options(args, settings)
    assert (settings.a, settings.b, settings.colour, settings.fast, settings.size) == (2, None, False, True, 3)
    resumed = Settings()
    apply_options(parser.parse_args(["--size", "3", "--fast"]), resumed, resume=True)
    assert resumed.fast and resumed.b == 5  # unchanged fixed setting accepted; no budget given
    with pytest.raises(ValueError, match="--size 4 differs from the run's 3"):
        apply_options(parser.parse_args(["--size", "4"]), Settings(), resume=True)
    assert PRESETS  # the reconstruct parser lists these names
