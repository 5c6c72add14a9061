"""Hostile inputs for avl_peft.safeio: each ends in ConfigError/DataError with a useful message, quickly.

Every case is a small file written to tmp_path (oversized ones are sparse, so nothing big touches the disk),
and the whole module runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml

from avl_peft.errors import ConfigError, DataError
from avl_peft.safeio import (
    JSON_MAX_BYTES,
    JSON_MAX_DEPTH,
    MAX_COMPONENT_CHARS,
    YAML_MAX_BYTES,
    YAML_MAX_DEPTH,
    default_out_dir,
    load_json,
    load_yaml,
    parse_yaml,
    safe_component,
    write_text_nofollow,
)
from avl_peft.validate import check_finite

REPO = Path(__file__).resolve().parents[1]


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def block_mapping(depth: int) -> str:
    return "".join(f"{'  ' * i}k:\n" for i in range(depth)) + f"{'  ' * depth}1\n"


def block_list(depth: int) -> str:
    return "".join(f"{'  ' * i}-\n" for i in range(depth)) + f"{'  ' * depth}1\n"


# --------------------------------------------------------------------------------------- YAML hostile

# (id, file content, exception, fragment of the message). Content may be bytes for non-text files.
YAML_CASES = [
    ("billion_laughs", billion_laughs(), ConfigError, "expands to more than 100,000 values"),
    ("deep_flow_list_100000", "[" * 100_000 + "]" * 100_000, ConfigError, f"deeper than {YAML_MAX_DEPTH}"),
    ("deep_flow_mapping", "{a: " * 5_000 + "1" + "}" * 5_000, ConfigError, "nesting deeper"),
    ("deep_block_mapping_400", block_mapping(400), ConfigError, f"deeper than {YAML_MAX_DEPTH} levels on line 65"),
    ("deep_block_list_400", block_list(400), ConfigError, "nesting deeper"),
    (
        "duplicate_top_level",
        "seed: 0\nname: a\nseed: 1\n",
        ConfigError,
        "duplicate key 'seed' on line 3 (first on line 1)",
    ),
    (
        "duplicate_nested",
        "training:\n  lr: 0.1\n  epochs: 1\n  lr: 0.2\n",
        ConfigError,
        "duplicate key 'lr' on line 4 (first on line 2)",
    ),
    ("duplicate_in_flow_variant", "variants: [{training.lr: 1, training.lr: 2}]\n", ConfigError, "duplicate key"),
    ("duplicate_via_inline_merge", "a: {<<: {x: 1, x: 2}, y: 3}\n", ConfigError, "duplicate key 'x'"),
    ("int_key_in_variant", "variants: [{1: 2}]\n", ConfigError, "key '1' on line 1 is read as the number 1"),
    ("null_key_in_grid", "grid:\n  null: [1, 2]\n", ConfigError, "key 'null' on line 2 is read as null"),
    ("tilde_key", "grid:\n  ~: [1]\n", ConfigError, "read as null"),
    ("empty_key", "? \n: 1\n", ConfigError, "read as null"),
    ("bool_key_on", "on: 1\n", ConfigError, "read as the boolean true"),
    ("float_key", "1.5: a\n", ConfigError, "read as the number 1.5"),
    ("list_as_key", "? [a, b]\n: 1\n", ConfigError, "the key on line 1 is a list"),
    ("mapping_as_key", "? {a: 1}\n: 1\n", ConfigError, "the key on line 1 is a mapping"),
    ("python_object_tag", "x: !!python/object/apply:os.system ['echo hi']\n", ConfigError, "python/object/apply"),
    ("python_name_tag", "x: !!python/name:os.system\n", ConfigError, "could not determine a constructor"),
    ("recursive_alias", "a: &a [1, *a]\n", ConfigError, "recursive structures are not allowed"),
    ("undefined_alias", "a: *nowhere\n", ConfigError, "no matching &nowhere anchor"),
    (
        "scalar_alias_amplification",
        "s: &s " + "x" * 2_000 + "\nl: [" + ", ".join(["*s"] * 1_000) + "]\n",
        ConfigError,
        "characters of text",
    ),
    ("huge_integer", "seed: " + "9" * 5_000 + "\n", ConfigError, "a value cannot be read"),
    ("impossible_timestamp", "name: 2001-13-45\n", ConfigError, "month must be in 1..12"),
    ("two_documents", "seed: 1\n---\nseed: 2\n", ConfigError, "expected a single document"),
    ("unclosed_bracket", "grid: {training.lr: [0.1, 0.2\n", ConfigError, "is not valid YAML"),
    ("nul_character", "name: a\x00b\n", ConfigError, "is not valid YAML"),
    ("binary_garbage", bytes(range(256)) * 4, ConfigError, "is not UTF-8 text"),
    ("latin1_text", "name: caf\xe9\n".encode("latin-1"), ConfigError, "is not UTF-8 text"),
]


@pytest.mark.parametrize(("content", "exc", "fragment"), [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES])
def test_hostile_yaml(tmp_path, content, exc, fragment):
    path = tmp_path / "study.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    with pytest.raises(exc) as info:
        load_yaml(path)
    assert fragment in str(info.value)
    assert "config file" in str(info.value) and "study.yaml" in str(info.value)
    assert time.perf_counter() - start < 2.0


def test_billion_laughs_stops_fast_and_plain_safe_load_would_not_be_bounded(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases count each time they are used"):
        load_yaml(path)
    assert time.perf_counter() - start < 2.0
    # Why it matters: PyYAML shares aliased objects, so loading is cheap, but the data claim 10**9 leaves
    # and anything that copies or dumps them (config.expand does both) runs out of memory.
    shared = yaml.safe_load(billion_laughs(levels=3))
    assert shared["l2"][0] is shared["l1"]


def test_oversized_yaml_checked_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.truncate(YAML_MAX_BYTES + 1)  # sparse: the size is in the metadata, nothing is written
    with pytest.raises(ConfigError, match=r"big.yaml' is 1,048,577 bytes, more than the 1,048,576 allowed"):
        load_yaml(path)


def test_yaml_limits_are_parameters(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: [[[1]]]\nb: [1, 2, 3, 4]\n")
    assert load_yaml(path) == {"a": [[[1]]], "b": [1, 2, 3, 4]}
    with pytest.raises(ConfigError, match="deeper than 3"):
        load_yaml(path, max_depth=3)
    with pytest.raises(ConfigError, match="more than 5 values"):
        load_yaml(path, max_nodes=5)
    with pytest.raises(ConfigError, match="more than the 10 allowed"):
        load_yaml(path, max_bytes=10)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("missing.yaml", "does not exist"), ("folder", "is a folder")],
)
def test_yaml_missing_or_folder(tmp_path, name, fragment):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=fragment):
        load_yaml(tmp_path / name)


def test_yaml_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # keeps open() below from blocking on an empty pipe
    try:
        with pytest.raises(ConfigError, match="not a regular file"):
            load_yaml(fifo)
    finally:
        os.close(writer)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"], ids=["empty", "blank", "comment"])
def test_empty_yaml_is_none(tmp_path, content):
    path = tmp_path / "empty.yaml"
    path.write_text(content)
    assert load_yaml(path) is None


VALID_YAML = [
    "seed: 0\ntraining: {lr: 1.0e-3, epochs: 2}\n",
    "grid:\n  training.lr: [0.1, 0.01]\nvariants:\n  - {method.name: lora, method.options.rank: 8}\n",
    "defaults: &d {epochs: 1, lr: 0.1}\nrun: {<<: *d, lr: 0.2}\nother: *d\n",
    "values: [1, 1.5, .nan, .inf, -.inf, 1e-3, true, yes, null, ~, '1', 2001-12-14]\n",
    "text: |\n  multi\n  line\nfolded: >\n  a\n  b\n",
    "\ufeffname: bom\n",
    "- 1\n- [2, [3, [4]]]\n",
    "just a scalar\n",
]


@pytest.mark.parametrize("text", VALID_YAML, ids=[f"inline{i}" for i in range(len(VALID_YAML))])
def test_valid_yaml_loads_like_safe_load(tmp_path, text):
    path = tmp_path / "ok.yaml"
    path.write_text(text, encoding="utf-8")
    expected = yaml.safe_load(text.lstrip("\ufeff"))
    # repr compares NaN with NaN (== would not) and tells 1 from 1.0 and True from 1.
    assert repr(load_yaml(path)) == repr(expected)
    assert repr(parse_yaml(text.lstrip("\ufeff"))) == repr(expected)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_like_safe_load(path):
    assert load_yaml(path) == yaml.safe_load(path.read_text())


def test_parse_yaml_names_the_option():
    assert parse_yaml("0.001") == 0.001
    assert parse_yaml("[1, 2]") == [1, 2]
    with pytest.raises(ConfigError, match=r"^--set grid.x: duplicate key 'a'"):
        parse_yaml("{a: 1, a: 2}", what="--set grid.x")
    with pytest.raises(ConfigError, match="longer than 8 bytes"):
        parse_yaml("123456789", what="--set seed", max_bytes=8)


@pytest.mark.parametrize(
    ("text", "bad"),
    [("lr: .nan", "nan"), ("lr: .inf", "inf"), ("lr: -.Inf", "-inf"), ("lr: 1.0e+999", "inf")],
)
def test_check_finite_rejects_non_finite(text, bad):
    value = parse_yaml(text)["lr"]
    with pytest.raises(ConfigError, match=f"^training.lr must be a finite number, got {bad}$"):
        check_finite(value, "training.lr")


@pytest.mark.parametrize("value", [0.1, 3, 0, -2.5, True, None, "nan", [1.0]])
def test_check_finite_passes_everything_else(value):
    assert check_finite(value, "training.lr") is value


# --------------------------------------------------------------------------------------- JSON hostile


def matrix_json(size: int) -> str:
    row = "[" + ",".join(["0.5"] * size) + "]"
    return '{"schema": 1, "accuracy_matrix": {"class_incremental": [' + ",".join([row] * size) + "]}}"


JSON_CASES = [
    ("deep_array_200000", "[" * 200_000 + "]" * 200_000, f"nests deeper than {JSON_MAX_DEPTH} levels (line 1)"),
    ("deep_objects", '{"a":' * 1_000 + "1" + "}" * 1_000, "nests deeper"),
    ("deep_on_later_line", '{\n"x":\n' + "[" * 200 + "]" * 200 + "}", "(line 3)"),
    ("matrix_1500x1500", matrix_json(1500), "more than the 500,000 a results file may have"),
    ("truncated", '{"schema": 1, "status": "fini', "is not valid JSON"),
    ("truncated_in_array", '{"schema": 1, "m": [[0.1, 0.2], [0.3', "is not valid JSON"),
    ("trailing_garbage", '{"schema": 1} {"schema": 2}', "Extra data"),
    ("empty", "", "is empty"),
    ("whitespace_only", " \n\t\n", "is empty"),
    ("huge_integer", '{"seed": ' + "9" * 5_000 + "}", "is not valid JSON"),
    ("binary_garbage", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("yaml_not_json", "schema: 1\nstatus: finished\n", "is not valid JSON"),
]


@pytest.mark.parametrize(("content", "fragment"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_hostile_json(tmp_path, content, fragment):
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_json(path)
    message = str(info.value)
    assert fragment in message and f"results file '{path}'" in message
    assert time.perf_counter() - start < 2.0


def test_oversized_json_checked_before_reading(tmp_path):
    path = tmp_path / "results.json"
    with open(path, "wb") as f:
        f.truncate(JSON_MAX_BYTES + 1)
    with pytest.raises(DataError, match="more than the 33,554,432 allowed"):
        load_json(path)


@pytest.mark.parametrize("name", ["missing.json", "folder"])
def test_json_missing_or_folder(tmp_path, name):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError) as info:
        load_json(tmp_path / name, what="state file")
    problem = str(info.value)
    assert problem.startswith("state file '") and ("does not exist" in problem or "folder" in problem)


VALID_JSON = [
    '{"schema": 1, "status": "finished", "metrics": {"acc": 0.5, "bwt": NaN, "x": -Infinity}}',
    '["[[[[[[ brackets in a string {{{{ do not nest", "\\"quoted\\" \\\\", "\\u00e9"]',
    "[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH,
    matrix_json(50),
    "null",
    '"just a string"',
]


@pytest.mark.parametrize("text", VALID_JSON, ids=[f"valid{i}" for i in range(len(VALID_JSON))])
def test_valid_json_loads_like_json_loads(tmp_path, text):
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    assert repr(load_json(path)) == repr(json.loads(text))


def test_json_nan_metric_survives(tmp_path):
    # A diverged run records NaN; the reader must not refuse it (the report shows n/a).
    (tmp_path / "results.json").write_text('{"acc": NaN}')
    assert math.isnan(load_json(tmp_path / "results.json")["acc"])


# ----------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lora-rank8-naive-s0", "lora-rank8-naive-s0"),
        ("lora-alpha16=x+y", "lora-alpha16=x+y"),
        ("..", "__"),
        (".", "_"),
        (".hidden", "_hidden"),
        ("../../x", "___.._x"),
        ("/abs", "_abs"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("a b\tc\nd", "a_b_c_d"),
        ("a\x00b", "a_b"),
        ("café-日本", "caf_-__"),
        ("~root", "_root"),
        ("$(rm -rf)", "__rm_-rf_"),
    ],
)
def test_safe_component(name, expected):
    assert safe_component(name) == expected


def test_safe_component_truncates_with_hash():
    long_a, long_b = "a" * 500, "a" * 499 + "b"
    out_a = safe_component(long_a)
    assert len(out_a) == MAX_COMPONENT_CHARS and out_a.startswith("a" * 150)
    assert out_a == safe_component(long_a)  # deterministic
    assert out_a != safe_component(long_b)  # distinct long names stay distinct
    assert len(safe_component("é" * 1000).encode()) <= 255  # within NAME_MAX in bytes, too
    assert safe_component("x" * MAX_COMPONENT_CHARS) == "x" * MAX_COMPONENT_CHARS


def test_safe_component_refuses_empty():
    with pytest.raises(ConfigError, match="run id is empty"):
        safe_component("")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("configs/quickstart.yaml", "runs/quickstart"),
        ("...yaml", "runs/__"),
        ("..yaml", "runs/_"),
        ("dir/.yaml", "runs/_yaml"),
        ("/tmp/my study.yml", "runs/my_study"),
    ],
)
def test_default_out_dir(config, expected):
    assert default_out_dir(config) == Path(expected)


def test_default_out_dir_without_a_name():
    with pytest.raises(ConfigError, match="pass --out"):
        default_out_dir("/")


@pytest.fixture
def outside(tmp_path):
    """A file outside the runs folder that a hostile link points to; it must never change."""
    target = tmp_path / "outside" / "precious.txt"
    target.parent.mkdir()
    target.write_text("keep me")
    return target


def test_write_replaces_a_symlink_instead_of_following_it(tmp_path, outside):
    root = tmp_path / "runs"
    root.mkdir()
    link = root / "report.md"
    link.symlink_to(outside)
    write_text_nofollow(link, "# report\n")
    assert outside.read_text() == "keep me"  # the link's target is untouched
    assert not link.is_symlink() and link.read_text() == "# report\n"
    assert [p.name for p in root.iterdir()] == ["report.md"]  # no temporary file left behind


def test_write_refuses_symlinked_folders_below_root(tmp_path, outside):
    root = tmp_path / "runs"
    (root / "run1").mkdir(parents=True)
    (root / "run1" / "plots").symlink_to(outside.parent, target_is_directory=True)
    with pytest.raises(ConfigError, match="plots' is a symbolic link or not a folder"):
        write_text_nofollow(root / "run1" / "plots" / "precious.txt", "overwritten", root=root)
    with pytest.raises(ConfigError, match="symbolic link"):  # without root, the parent itself is checked
        write_text_nofollow(root / "run1" / "plots" / "precious.txt", "overwritten")
    assert outside.read_text() == "keep me"
    assert sorted(p.name for p in outside.parent.iterdir()) == ["precious.txt"]


def test_write_trusts_a_linked_root_and_creates_folders(tmp_path, outside):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out-link"
    out.symlink_to(scratch, target_is_directory=True)  # e.g. --out pointing at a scratch disk
    write_text_nofollow(out / "run1" / "tb" / "results.json", "{}", root=out)
    assert (scratch / "run1" / "tb" / "results.json").read_text() == "{}"
    with pytest.raises(ConfigError, match="is not inside"):
        write_text_nofollow(tmp_path / "elsewhere.txt", "x", root=out)
    with pytest.raises(ConfigError, match="is not inside"):
        write_text_nofollow(out / ".." / "outside" / "precious.txt", "x", root=out)
    assert outside.read_text() == "keep me"


def test_write_overwrites_atomically_and_keeps_permissions_default(tmp_path):
    path = tmp_path / "state.json"
    write_text_nofollow(path, "one")
    write_text_nofollow(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------------
# Images, safetensors headers, folder locks and the compile cache
# ------------------------------------------------------------------------------------------------------

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


def test_a_png_holding_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin, Image

    from avl_peft.safeio.images import open_image

    path = tmp_path / "letter.png"
    path.write_bytes(POSTSCRIPT)
    with Image.open(path) as img:
        assert img.format == "EPS"  # what Pillow picks by content without an allow-list: decoding runs gs
    started = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: started.append(a))
    with pytest.raises(DataError, match=r"letter.png' is not a BMP, GIF, JPEG, PNG, TIFF image"):
        open_image(path, "RGB")
    assert not started


def test_image_pixel_budget_before_decoding_and_resizing(tmp_path):
    from PIL import Image

    from avl_peft.safeio.images import check_image, open_image

    Image.new("L", (40, 10)).save(tmp_path / "wide.png")
    assert open_image(tmp_path / "wide.png", "RGB", max_pixels=400).size == (40, 10)
    with pytest.raises(DataError, match=r"40 x 10 pixels, more than the 399 allowed"):
        check_image(tmp_path / "wide.png", max_pixels=399)
    # 40 x 10 with its shorter side resized to 10 stays 400 pixels; to 20 it becomes 80 x 20 = 1,600.
    assert check_image(tmp_path / "wide.png", max_pixels=400, short_side=10) == (40, 10)
    with pytest.raises(DataError, match=r"become 1,600 once its shorter side is resized to 20"):
        check_image(tmp_path / "wide.png", max_pixels=1000, short_side=20)


def test_image_lister_refuses_a_fifo_and_skips_other_files(tmp_path):
    from avl_peft.safeio.images import image_files

    for name in ("b.PNG", "a.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in image_files(tmp_path)] == ["a.jpeg", "b.PNG"]
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match=r"pipe.png' has an image suffix but is not a regular file"):
        image_files(tmp_path)


def test_safetensors_shapes_come_from_the_checked_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    from avl_peft.safeio import safetensors_shapes

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(path))
    assert safetensors_shapes(path, what="weights", max_bytes=1 << 20) == {"a": (2, 3), "b": (4,)}
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"weights '.*w.safetensors': 1 bytes after the last tensor"):
        safetensors_shapes(path, what="weights", max_bytes=1 << 20)
    with pytest.raises(DataError, match=r"is not a regular file"):
        safetensors_shapes(tmp_path, what="weights", max_bytes=1 << 20)


def test_folder_lock_names_its_holder_and_refuses_links(tmp_path):
    from avl_peft.safeio.locks import folder_lock, lock_holder

    with folder_lock(tmp_path / "run", blocking=False) as mine:
        assert mine and lock_holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
    assert lock_holder(tmp_path / "run") is None
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=r"\.lock' \(the lock of folder .*\) is a symbolic link"):
        with folder_lock(tmp_path / "linked", blocking=False):
            pass
    assert victim.read_text() == "keep me"


def test_compile_caches_go_to_the_project_cache(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from avl_peft.cl.precision import CompilePlugin
    from avl_peft.hardware import isa_key

    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what Inductor sets on first use
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    CompilePlugin()._redirect_caches()
    isa = tmp_path / "compile" / isa_key()  # one folder per ISA (tests/test_hardware.py)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(isa / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(isa / "triton")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice is kept
    CompilePlugin()._redirect_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_cache_folder_follows_xdg_cache_home_unless_avl_peft_cache_is_set(tmp_path, monkeypatch):
    from avl_peft.safeio import project_cache_dir

    monkeypatch.delenv("AVL_PEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert project_cache_dir("pretrain") == tmp_path / "xdg" / "avl-peft" / "pretrain"
    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path / "mine"))
    assert project_cache_dir("pretrain") == tmp_path / "mine" / "pretrain"
