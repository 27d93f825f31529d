"""The stages inside the project's container image (``make image``, a profile's ``container:`` key).

With the real image and charliecloud: the whole pipeline through ``dvc exp run`` inside it, compared
with the same pipeline outside (data byte for byte, the same losses), the image named by version.lock,
every output's stamp and ``virgo-exps verify``; on the simulated Slurm cluster, 2-node DDP whose srun
line starts ch-run. Without the image: a missing or damaged image refused before any stage works, the
profile key checked, the Apptainer form of the batch script (a golden file in tests/golden).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, ROOT, make_repo, sh, tool_env
from virgo_exps import container
from virgo_exps.config import ConfigError

IMAGE_LINK = ROOT / ".virgo" / "image"


def built_image() -> Path:
    """The image `make image` built for this checkout (the folder with root/, virgo.sqfs, image.json)."""
    if not (IMAGE_LINK / "image.json").is_file() or shutil.which("ch-run") is None:
        pytest.skip("no image: `make image` (needs mmdebstrap, charliecloud, squashfs-tools) builds it")
    return IMAGE_LINK.resolve()


def use_image(repo: Path, image: Path) -> None:
    (repo / ".virgo").mkdir(exist_ok=True)
    (repo / ".virgo" / "image").symlink_to(image, target_is_directory=True)


def dvc(repo: Path, *args, env=None, check=True):
    return sh([str(BIN / "dvc"), *args], repo, env=env, check=check)


def tiny_image(tmp_path: Path) -> Path:
    """A small folder with a manifest written the way `make image` writes it."""
    root = tmp_path / "img"
    (root / "opt" / "venv" / "bin").mkdir(parents=True)
    (root / "opt" / "venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (root / "work").mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "os-release").write_text("ID=debian\n")
    container.write_manifest(root, {"suite": "test"})
    return root


def test_the_digest_is_of_the_files_and_a_changed_file_is_found(tmp_path):
    root = tiny_image(tmp_path)
    manifest, found = container.problems(root, hashed=True)
    assert found == [] and manifest["digest"].startswith("sha256:")
    again = container.write_manifest(root, {"suite": "test", "other": "input"})
    assert again["digest"] == manifest["digest"]  # the digest is the files', not the build's notes
    (root / "etc" / "os-release").write_text("ID=ubuntu\n")  # the same size: only the content differs
    assert container.problems(root)[1] == []  # the quick check compares kinds and sizes
    assert container.problems(root, hashed=True)[1] == ["etc/os-release: differs from the manifest"]
    (root / "etc" / "extra").write_text("x")
    (root / "opt" / "venv" / "bin" / "python").unlink()
    assert container.problems(root)[1] == ["etc/extra: not in the manifest", "opt/venv/bin/python: missing"]


def write_profile(repo: Path, name: str, body: dict) -> None:
    folder = repo / "machines" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "machine.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


@pytest.mark.parametrize(
    "block, words",
    [
        ({"runtime": "docker", "image": "x"}, "container.runtime: 'docker' is not allowed; expected one of"),
        ({"runtime": "charliecloud"}, "container.image: missing"),
        ({"image": "x", "gpus": True}, "container.gpus: unknown key"),
        ({"image": "x", "bind": "/data"}, "container.bind: expected"),
    ],
)
def test_a_bad_container_block_is_one_line_naming_the_key(repo, block, words):
    write_profile(repo, "bad", {"kind": "local", "container": block})
    out = sh(
        [str(BIN / "python"), "stages/environment.py", "--out", "version.lock"],
        repo,
        env=tool_env({"VIRGO_MACHINE": "bad"}),
        check=False,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated", "no manifest"])
def test_a_missing_or_damaged_image_is_refused_before_any_stage_works(tmp_path, repo, damage):
    image = tiny_image(tmp_path)
    if damage == "missing":
        shutil.rmtree(image)
    elif damage == "truncated":
        (image / "etc" / "os-release").write_text("")
    else:
        (image / container.MANIFEST).unlink()
    write_profile(repo, "boxed", {"kind": "local", "container": {"runtime": "charliecloud", "image": str(image)}})

    def files():
        return {p.relative_to(repo).as_posix() for p in repo.rglob("*") if not {".git", ".dvc"} & set(p.parts)}

    before = files()
    out = dvc(repo, "exp", "run", env=tool_env({"VIRGO_MACHINE": "boxed"}), check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    expected = {
        "missing": "does not exist; build it with `make image`",
        "truncated": "is damaged: 1 file(s) differ from its manifest (first: etc/os-release: differs",
        "no manifest": f"no readable {container.MANIFEST}",
    }[damage]
    assert f"error: container.image: {image}" in text and expected in text, text
    assert "Running stage 'generate'" not in text  # the first stage refused: nothing else ran
    after = files()
    assert [p for p in after if p.startswith(("data/", "results/"))] == [], after
    assert before - after == set()  # nothing deleted


def test_the_apptainer_batch_script_of_the_booster_wraps_every_srun_step():
    golden = (ROOT / "tests" / "golden" / "juwels-booster-deepspeed-4x4.sbatch").read_text()
    run_line = next(line for line in golden.splitlines() if line.startswith("VIRGO_IMAGE_RUN="))
    assert run_line.startswith("VIRGO_IMAGE_RUN=(apptainer exec --nv ")
    assert "/p/project/CHANGE-ME/virgo-exps/virgo.sif" in run_line
    assert "--pwd /home/user/virgo-exps/.dvc/tmp/exps/" in run_line and "--bind /home/user/virgo-exps" in run_line
    assert "VIRGO_PYTHON=/opt/venv/bin/python" in golden
    sruns = [line for line in golden.splitlines() if line.lstrip().startswith("srun ")]
    assert sruns and all('"${VIRGO_IMAGE_RUN[@]}"' in line for line in sruns), sruns


def test_charliecloud_binds_the_top_folders_and_refuses_one_under_the_images_own():
    c = container.Container(runtime="charliecloud", image="/x", bind=("/scratch/team/store",))
    assert container.binds(c, [Path("/work/me/repo"), Path("/work/me/repo/src"), Path("/scratch/a")]) == [
        "/scratch",
        "/work",
    ]
    a = container.Container(runtime="apptainer", image="/x")
    assert container.binds(a, [Path("/work/me/repo"), Path("/work/me/repo/src"), Path("/tmp/x")]) == ["/work/me/repo"]
    with pytest.raises(ConfigError, match="lies under /opt, which the image has of its own"):
        container.binds(c, [Path("/opt/repo")])


def _arrays(store: Path) -> dict[str, bytes]:
    """Every chunk and array metadata file of a zarr store; the root's attributes apart."""
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.relative_to(store).as_posix() != "zarr.json"
    }


def _attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text()).get("attributes", {})


def _without_image(stamp):
    """A stamp less what names the image: the image, and the digest of an input whose own stamp names it."""
    if isinstance(stamp, dict):
        return {k: _without_image(v) for k, v in stamp.items() if k not in ("image", "inputs")}
    return stamp


@pytest.mark.slow
def test_the_pipeline_inside_the_image_gives_the_results_of_the_pipeline_outside(tmp_path):
    image = built_image()
    digest = json.loads((image / "image.json").read_text())["digest"]
    repo = make_repo(tmp_path / "repo")
    use_image(repo, image)
    dvc(repo, "exp", "run")
    outside = {
        "raw": _arrays(repo / "data/raw.zarr"),
        "images": _arrays(repo / "data/images.zarr"),
        "attrs": _attrs(repo / "data/images.zarr"),
        "epochs": pd.read_csv(repo / "results/epochs.csv"),
    }
    assert "image" not in yaml.safe_load((repo / "version.lock").read_text())
    assert "image" not in _attrs(repo / "data/images.zarr")["provenance"]
    verify = sh([str(BIN / "virgo-exps"), "verify"], repo, check=False)
    assert "ok: results/model.pt: made with the params of params.yaml (train), outside any container image" in (
        verify.stdout
    )

    # Every stage again, inside (the data stages do not depend on version.lock; a finished training's
    # snapshot would be taken up again, so it goes)
    shutil.rmtree(repo / "checkpoints")
    shutil.rmtree(repo / ".virgo" / "snapshots", ignore_errors=True)
    run = dvc(repo, "exp", "run", "--force", env=tool_env({"VIRGO_MACHINE": "local-image"}))
    text = run.stdout + run.stderr
    for stage in ("environment", "generate", "preprocess", "train", "report"):
        assert f"Running stage '{stage}'" in text, text[-3000:]
    assert "launch: train on 'local-image': /opt/venv/bin/python stages/train.py" in text, text[-3000:]
    lock = yaml.safe_load((repo / "version.lock").read_text())
    assert lock["image"] == digest
    # the data byte for byte (the root's stamp names the image besides)
    assert _arrays(repo / "data/raw.zarr") == outside["raw"]
    assert _arrays(repo / "data/images.zarr") == outside["images"]
    inside_attrs = _attrs(repo / "data/images.zarr")
    assert inside_attrs["provenance"]["image"] == digest
    assert inside_attrs["provenance"]["upstream"]["image"] == digest
    assert _without_image(inside_attrs) == _without_image(outside["attrs"])
    # the same training
    epochs = pd.read_csv(repo / "results/epochs.csv")
    for column in ("train_loss", "val_loss"):
        assert epochs[column].tolist() == outside["epochs"][column].tolist(), column
    run_json = json.loads((repo / "results/run.json").read_text())
    assert run_json["provenance"]["image"] == digest
    verify = sh([str(BIN / "virgo-exps"), "verify"], repo, check=False)
    assert f"ok: results/model.pt: made with the params of params.yaml (train), inside image {digest}" in verify.stdout
    assert f"data/images.zarr: made with the params of params.yaml (preprocess), inside image {digest}" in verify.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_ddp_on_two_slurm_nodes_runs_inside_the_image(tmp_path, slurm_multinode):
    from test_slurm_launch import cluster_env

    image = built_image()
    digest = json.loads((image / "image.json").read_text())["digest"]
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 2}})
    use_image(repo, image)
    (repo / ".slurmsim").symlink_to(slurm_multinode.workdir, target_is_directory=True)
    env = cluster_env(slurm_multinode, "simcluster-image")
    dvc(repo, "exp", "run", env={**env, "VIRGO_MACHINE": "local"})  # the reference: one process, no image
    reference = pd.read_csv(repo / "results/epochs.csv")
    dvc(repo, "exp", "run", "-S", "train.strategy=ddp", "-S", "train.nodes=2", env=env)
    ranks = json.loads((repo / "results/ranks.json").read_text())
    assert len({r["host"] for r in ranks}) == 2 and {r["host"] for r in ranks} <= set(slurm_multinode.node_names)
    run_json = json.loads((repo / "results/run.json").read_text())
    assert run_json["machine"] == "simcluster-image" and run_json["provenance"]["image"] == digest
    assert yaml.safe_load((repo / "version.lock").read_text())["image"] == digest
    scripts = sorted((repo / "logs" / "train").glob("*.sbatch"))
    assert scripts, list((repo / "logs" / "train").iterdir())
    text = scripts[-1].read_text()
    assert (
        "VIRGO_IMAGE_RUN=(ch-run " in text
        and '"${VIRGO_IMAGE_RUN[@]}" "$VIRGO_PYTHON" -m torch.distributed.run' in text
    )
    got = pd.read_csv(repo / "results/epochs.csv")
    for column in ("train_loss", "val_loss"):  # 2 DDP ranks in the image follow one process outside
        assert got[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-4), column


@pytest.mark.slow
def test_a_checkout_under_a_top_folder_the_image_lacks_is_refused_then_runs_in_the_image_make_image_adds(
    tmp_path,
):
    """Charliecloud binds only onto folders the image has: a checkout under /<new>/ is refused in one line
    naming the folder; the image `make image` derives with that folder added (hard links) runs it."""
    if os.getuid() != 0:
        pytest.skip("needs root, to make a folder at the top of the host's tree")
    image = built_image()
    info = json.loads((image / "image.json").read_text())
    base = Path(info.get("base", image))
    top = Path(f"/virgo-t{uuid.uuid4().hex[:8]}")
    top.mkdir(mode=0o700)
    try:
        repo = make_repo(top / "repo")
        use_image(repo, image)
        env = tool_env({"VIRGO_MACHINE": "local-image"})
        refused = dvc(repo, "repro", "environment", env=env, check=False)
        assert refused.returncode != 0
        assert f"has no folder {top} to bind the host's {top} onto; run `make image` in a checkout under {top}" in (
            refused.stdout + refused.stderr
        )
        assert not (repo / "version.lock").exists() or "image" not in (repo / "version.lock").read_text()

        derived = tmp_path / "derived"
        added = sorted({str(top), *info.get("added_top_folders", [])})
        made = container.derive(base, derived, added)
        assert (
            made["added_top_folders"] == added
            and made["digest"] != json.loads((base / "image.json").read_text())["digest"]
        )
        # the files are the base's own (hard links), the manifest a new file that names the added folders
        probe = "opt/venv/bin/python3"
        assert (derived / "root" / probe).lstat().st_ino == (base / "root" / probe).lstat().st_ino
        assert (derived / "root" / container.MANIFEST).stat().st_ino != (
            base / "root" / container.MANIFEST
        ).stat().st_ino
        assert json.loads((base / "root" / container.MANIFEST).read_text())["digest"] != made["digest"]
        assert (
            sh([str(BIN / "python"), "-m", "virgo_exps.container", "verify", str(derived / "root")], repo).returncode
            == 0
        )
        (repo / ".virgo" / "image").unlink()
        use_image(repo, derived)
        dvc(repo, "repro", "environment", env=env)
        assert yaml.safe_load((repo / "version.lock").read_text())["image"] == made["digest"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="squashfs-tools is not installed")
def test_a_squashfs_image_is_checked_from_its_index_and_a_cut_file_refused(tmp_path):
    root = tiny_image(tmp_path)
    sqfs = tmp_path / "img.sqfs"
    sh(["mksquashfs", str(root), str(sqfs), "-quiet", "-no-progress", "-noappend", "-all-root"], tmp_path)
    manifest, found = container.problems(sqfs)
    assert found == [] and manifest["digest"] == container.read_manifest(root)["digest"]
    cut = tmp_path / "cut.sqfs"
    used = int.from_bytes(sqfs.read_bytes()[40:48], "little")  # the superblock's bytes in use
    cut.write_bytes(sqfs.read_bytes()[: used - 1])
    with pytest.raises(ConfigError, match=f"container.image: {cut} is damaged: it is cut short"):
        container.check(container.Container(image=str(cut)))
    (tmp_path / "other.sqfs").write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError, match="is damaged: it is not a SquashFS file"):
        container.check(container.Container(image=str(tmp_path / "other.sqfs")))
