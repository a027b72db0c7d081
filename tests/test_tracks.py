"""Tracks (conf/track/<name>.yaml) are what `dvc exp run -S track=<name>` composes into
params.yaml through DVC's Hydra support; the committed params.yaml is the default track."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump

from kdsweep.config import load_params, parse_params

REPO = Path(__file__).resolve().parents[1]
TRACKS = sorted(p.stem for p in (REPO / "conf/track").glob("*.yaml"))


def test_params_yaml_is_the_default_track_byte_for_byte() -> None:
    assert (REPO / "params.yaml").read_bytes() == (REPO / "conf/track/default.yaml").read_bytes(), (
        "params.yaml (what `dvc repro` reads) differs from conf/track/default.yaml (what "
        "`dvc exp run -S` composes from): edit the track, then `cp conf/track/default.yaml "
        "params.yaml`"
    )


def test_hydra_is_enabled_for_dvc_exp_run() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc/config")
    assert config.getboolean("hydra", "enabled")


@pytest.mark.parametrize("track", TRACKS)
def test_each_track_composes_to_itself_and_is_valid(track: str, tmp_path: Path) -> None:
    """DVC's own composition of `track=<name>` gives exactly the track file's params, which
    validate and name their track."""
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(REPO), [f"track={track}"])
    composed = yaml.safe_load(out.read_text())
    assert composed == yaml.safe_load((REPO / f"conf/track/{track}.yaml").read_text())
    assert parse_params(composed).track == track
    assert load_params(out).track == track


def test_the_tracks_the_readme_names_exist() -> None:
    readme = (REPO / "README.md").read_text()
    named = {t for t in TRACKS if f"-S track={t}" in readme}
    assert named == set(TRACKS) - {"default"}
