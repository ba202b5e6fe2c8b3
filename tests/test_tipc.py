"""Tests of test_tipc/: the config parser in common_func.sh, the four configs, and the driver's logic.

The bash helpers are called through ``bash -c 'source test_tipc/common_func.sh; ...'``. The driver
and prepare.sh are exercised on a throw-away copy of test_tipc/ whose train.py, eval.py,
export_model.py and infer.py are stubs that record their arguments, so these tests take seconds
and do not need the deploy scripts. The real chain (prepare.sh + the driver on the real scripts)
runs in CI, not here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models import model_config

ROOT = Path(__file__).resolve().parents[1]
TIPC = ROOT / "test_tipc"
COMMON = TIPC / "common_func.sh"
MODES = ("lite_train_lite_infer", "lite_train_whole_infer", "whole_infer", "whole_train_whole_infer")
METHOD_OF = {"OrthoAD": "ortho", "PaDiM": "padim", "SPADE": "spade", "PatchCore": "patchcore"}
CONFIGS = {name: (method, TIPC / "configs" / name / "train_infer_python.txt")
           for name, method in METHOD_OF.items()}

# 1-based line number -> key of the line (section headers and "##" checked separately).
EXPECTED_KEYS = {
    2: "model_name", 3: "python", 4: "gpu_list", 5: "--device", 6: "auto_cast", 7: "--resize",
    8: "--save_path", 9: "--batch_size", 10: "--pretrained", 11: "train_model_name",
    12: "train_infer_img_dir", 13: "--data_path", 14: "--category",
    16: "trainer", 17: "norm_train", 18: "pact_train", 19: "fpgm_train", 20: "distill_train",
    21: "null", 22: "null",
    25: "eval", 26: "null",
    29: "--save_dir", 30: "--model_path", 31: "norm_export", 32: "quant_export",
    33: "fpgm_export", 34: "distill_export", 35: "--img_size", 36: "null", 37: "inference_dir",
    38: "infer_model", 39: "infer_export", 40: "infer_quant", 41: "inference", 42: "--use_gpu",
    43: "--enable_mkldnn", 44: "--cpu_threads", 45: "--batch_size", 46: "--use_tensorrt",
    47: "--precision", 48: "--model_file", 49: "--params_file", 50: "--input_file",
    51: "--save_path", 52: "--enable_benchmark", 53: "null",
}
PER_MODE_LINES = (7, 9, 12, 13, 14, 35)  # must give a value for each of the four modes

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


def bash(script: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    """Run ``script`` in bash with test_tipc/common_func.sh sourced; ``args`` are $1, $2, ..."""
    return subprocess.run(["bash", "-c", f'source "{COMMON}"; {script}', "bash", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def out(script: str, *args: str) -> str:
    result = bash(script, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix("\n")


# ---- common_func.sh ----------------------------------------------------------------------------

@needs_bash
@pytest.mark.parametrize(("line", "key", "value"), [
    ("a:b", "a", "b"),
    ("--use_gpu:True|False", "--use_gpu", "True|False"),
    ("norm_train:train.py --method ortho --k 100", "norm_train", "train.py --method ortho --k 100"),
    ("url:http://host:80/x", "url", "http://host:80/x"),  # split on the first ':' only
    ("--model_path:", "--model_path", ""),
    ("null:null", "null", "null"),
    ("##", "##", ""),
    ("====train_params====", "====train_params====", ""),
])
def test_parser_key_and_value(line, key, value):
    assert out('func_parser_key "$1"', line) == key
    assert out('func_parser_value "$1"', line) == value


@needs_bash
@pytest.mark.parametrize(("line", "mode", "expected"), [
    ("--resize:lite_train_lite_infer=64|whole_train_whole_infer=256", "lite_train_lite_infer", "64"),
    ("--resize:lite_train_lite_infer=64|whole_train_whole_infer=256", "whole_train_whole_infer",
     "256"),
    # a mode that is not listed drops the argument ...
    ("--resize:lite_train_lite_infer=64|whole_train_whole_infer=256", "whole_infer", "null"),
    # ... unless an entry without "MODE=" gives the default
    ("--resize:lite_train_lite_infer=64|128", "whole_infer", "128"),
    ("--resize:lite_train_lite_infer=64|128", "lite_train_lite_infer", "64"),
    # "lite_train_lite_infer" must not match "lite_train_whole_infer" by prefix
    ("--x:lite_train_whole_infer=2|lite_train_lite_infer=1", "lite_train_lite_infer", "1"),
    ("--x:whole_infer=a|whole_train_whole_infer=b", "whole_train_whole_infer", "b"),
    # values that are not per-mode pass through unchanged (lists are looped over later)
    ("--use_gpu:True|False", "whole_infer", "True|False"),
    ("--pretrained:none", "lite_train_lite_infer", "none"),
    ("--opt:a=b", "lite_train_lite_infer", "a=b"),
    ("--data_path:whole_infer=./d/x=y", "whole_infer", "./d/x=y"),
    ("--x:whole_infer=", "whole_infer", "null"),
    ("null:null", "whole_infer", "null"),
])
def test_parser_params_selects_by_mode(line, mode, expected):
    assert out('func_parser_params "$1" "$2"', line, mode) == expected


@needs_bash
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("--use_gpu", "True", "--use_gpu True"),
    ("--data_path", "./test_tipc/data/lite", "--data_path ./test_tipc/data/lite"),
    ("null", "True", ""),
    ("--use_gpu", "null", ""),
    ("--model_path", "", ""),
    ("", "x", ""),
    ("--k", "  ", ""),
])
def test_set_params_drops_null(key, value, expected):
    assert out('func_set_params "$1" "$2"', key, value) == expected


@needs_bash
def test_join_split_and_null_helpers():
    assert out('func_join "" "python" " " "train.py --k 1" ""') == "python train.py --k 1"
    assert out('func_split_list "$1" xs; printf "%s," "${xs[@]}"', "True|False") == "True,False,"
    assert out('func_split_list "$1" xs; printf "%s," "${xs[@]}"', "1") == "1,"
    assert out('func_split_list "" xs; printf "%s," "${xs[@]}"') == "null,"
    for value in ("null", "", "  "):
        assert bash('func_is_null "$1"', value).returncode == 0
    assert bash('func_is_null "$1"', "none").returncode == 1
    for mode in MODES:
        assert bash('func_is_mode "$1"', mode).returncode == 0
    assert bash('func_is_mode "$1"', "lite").returncode == 1


@needs_bash
def test_read_config_strips_crlf_and_keeps_every_line(tmp_path):
    config = tmp_path / "c.txt"
    config.write_bytes(b"a:1\r\n\r\nb:2  \nc:3")  # CRLF, an empty line, trailing blanks, no final \n
    assert out('func_read_config "$1" ls; printf "[%s]" "${ls[@]}"', str(config)) == \
        "[a:1][][b:2][c:3]"


@needs_bash
def test_has_cuda_override_and_detection():
    assert out("TIPC_HAS_CUDA=True func_has_cuda python") == "True"
    assert out("TIPC_HAS_CUDA=False func_has_cuda python") == "False"
    assert out('func_has_cuda /nonexistent/python') == "False"  # no Paddle: treated as a CPU build


@needs_bash
def test_status_check_and_skip_write_the_result_lines(tmp_path):
    log = tmp_path / "results_python.log"
    run_log = tmp_path / "run.log"
    run_log.write_text("line 1\nTraceback: boom\n")
    ok = bash('status_check 0 "python a.py > x.log 2>&1" "$1"', str(log))
    failed = bash('status_check 3 "python b.py" "$1" "$2"', str(log), str(run_log))
    skipped = bash('status_skip "no CUDA" "python c.py --use_gpu True" "$1"', str(log))
    assert ok.returncode == failed.returncode == skipped.returncode == 0
    assert "Traceback: boom" in failed.stdout  # the end of the failing command's log is shown
    assert log.read_text().splitlines() == [
        "Run successfully with command - python a.py > x.log 2>&1!",
        "Run failed with command - python b.py!",
        "Skipped (no CUDA) with command - python c.py --use_gpu True!",
    ]


@needs_bash
def test_run_cmd_returns_the_status_and_captures_both_streams(tmp_path):
    log = tmp_path / "o.log"
    script = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"
    code = tmp_path / "s.py"
    code.write_text(script)
    result = bash('func_run_cmd "$1 $2" "$3"', sys.executable, str(code), str(log))
    assert result.returncode == 4
    assert log.read_text().split() == ["out", "err"]


# ---- the configs ------------------------------------------------------------------------------

def parse_config(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every line, as common_func.sh parses them."""
    script = ('func_read_config "$1" ls; for l in "${ls[@]}"; do '
              'printf "%s\\t%s\\n" "$(func_parser_key "$l")" "$(func_parser_value "$l")"; done')
    lines = out(script, str(path)).split("\n")
    return [tuple(line.split("\t", 1)) for line in lines]  # type: ignore[misc]


def mode_value(path: Path, line_no: int, mode: str) -> str:
    return out('func_read_config "$1" ls; func_parser_params "${ls[$2]}" "$3"',
               str(path), str(line_no - 1), mode)


def flags(command: str) -> dict[str, str]:
    words = shlex.split(command)
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def test_every_config_folder_is_checked():
    """CI runs every folder of test_tipc/configs: each must be one of the configs checked here."""
    folders = {path.parent.name for path in (TIPC / "configs").glob("*/train_infer_python.txt")}
    assert folders == set(CONFIGS)


@needs_bash
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_config_has_the_expected_keys_at_the_expected_lines(model):
    method, path = CONFIGS[model]
    parsed = parse_config(path)
    assert len(parsed) == 53
    for line_no, header in ((1, "train_params"), (24, "eval_params"), (28, "infer_params")):
        assert parsed[line_no - 1][0].startswith("=====") and header in parsed[line_no - 1][0]
    for line_no in (15, 23, 27):
        assert parsed[line_no - 1][0] == "##"
    for line_no, key in EXPECTED_KEYS.items():
        assert parsed[line_no - 1][0] == key, f"line {line_no}"
    values = {line_no: parsed[line_no - 1][1] for line_no in EXPECTED_KEYS}
    assert values[2] == model == path.parent.name
    assert values[4] == "-1|0" and values[5] == "cpu|gpu"
    assert values[10] == "none"  # offline: no ImageNet download in TIPC
    assert values[16] == "norm_train"
    assert values[42] == "True|False" and values[43] == "True|False"
    assert values[44] == "1|2" and values[45] == "1"
    assert values[46] == "False" and values[47] == "fp32"
    assert values[48] == "model.json" and values[49] == "model.pdiparams"
    assert values[51] == "infer_results"  # inference outputs stay under test_tipc/output
    for line_no in (18, 19, 20, 32, 33, 34):
        assert values[line_no] == "null"


@needs_bash
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_config_per_mode_values(model):
    _, path = CONFIGS[model]
    for line_no in PER_MODE_LINES:
        for mode in MODES:
            assert mode_value(path, line_no, mode) != "null", f"line {line_no}, {mode}"
    assert mode_value(path, 7, "lite_train_lite_infer") == "64"
    assert mode_value(path, 7, "whole_train_whole_infer") == "256"
    for mode in MODES:  # the export size is the training size
        assert mode_value(path, 35, mode) == mode_value(path, 7, mode)
    assert mode_value(path, 13, "lite_train_lite_infer") == "./test_tipc/data/lite"
    assert mode_value(path, 14, "lite_train_lite_infer") == "tiles"
    assert mode_value(path, 13, "whole_infer") == "./test_tipc/data/whole"
    assert mode_value(path, 14, "whole_infer") == "magnetic_tile"
    assert mode_value(path, 12, "lite_train_lite_infer") == "./test_tipc/data/lite_infer"


@needs_bash
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_config_names_one_model_everywhere(model):
    method, path = CONFIGS[model]
    values = dict(enumerate((v for _, v in parse_config(path)), start=1))
    name = values[11]
    commands = {line_no: values[line_no] for line_no in (17, 25, 31, 39)}
    for line_no, command in commands.items():
        f = flags(command)
        k = int(f["--k"]) if "--k" in f else None
        assert model_config(f["--method"], strict=False, arch=f["--arch"], k=k).run_name == name, \
            f"line {line_no}"
        assert f["--method"] == method
    assert commands[17].split()[0] == "train.py"
    assert commands[25].split()[0] == "eval.py"
    assert commands[31].split()[0] == commands[39].split()[0] == "export_model.py"
    assert values[38] == f"./test_tipc/data/whole_model/{name}/magnetic_tile.npz"
    assert values[41] == "infer.py"


@pytest.mark.parametrize("model", sorted(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_train_and_eval_accept_the_config_arguments(model, mode):
    """The commands the driver builds from the config parse with train.py's and eval.py's CLIs."""
    import eval as eval_script
    import train as train_script

    _, path = CONFIGS[model]
    value = {n: mode_value(path, n, mode) for n in (7, 9, 10, 13, 14)}
    common = ["--device", "cpu", "--data_path", value[13], "--category", value[14],
              "--resize", value[7], "--batch_size", value[9]]
    parsed = parse_config(path)
    train_args = parsed[16][1].split()[1:] + common + ["--pretrained", value[10],
                                                      "--save_path", "out"]
    args = train_script.parse_args(train_args)
    assert (args.pretrained, args.resize, args.category) == ("none", int(value[7]), value[14])
    eval_args = parsed[24][1].split()[1:] + common + ["--model_path", "out/x"]
    assert eval_script.parse_args(eval_args).model_path == "out/x"


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_deploy_scripts_accept_the_config_arguments(model):
    """The export and inference commands the driver builds parse with their CLIs."""
    if not (ROOT / "export_model.py").is_file() or not (ROOT / "infer.py").is_file():
        pytest.skip("export_model.py / infer.py not in the tree")
    import export_model
    import infer

    _, path = CONFIGS[model]
    parsed = parse_config(path)
    for mode in MODES:
        size = mode_value(path, 35, mode)
        for line_no in (31, 39):
            args = export_model.parse_args(parsed[line_no - 1][1].split()[1:] + [
                "--model_path", "m.npz", "--save_dir", "out", "--img_size", size])
            assert args.img_size == int(size) and args.format == "json"
    v = {n: parsed[n - 1][1] for n in range(42, 53)}
    k = {n: parsed[n - 1][0] for n in range(42, 53)}
    for use_gpu in v[42].split("|"):
        for mkldnn in v[43].split("|"):
            argv = [k[42], use_gpu, k[43], mkldnn, k[44], v[44].split("|")[0],
                    k[45], v[45], k[46], v[46], k[47], v[47], k[48], f"d/{v[48]}",
                    k[49], f"d/{v[49]}", k[50], v[50], k[51], f"o/{v[51]}", k[52], v[52]]
            args = infer.parse_args(argv)
            assert args.use_gpu is (use_gpu == "True") and args.enable_benchmark is True
            assert args.model_file == "d/model.json" and args.params_file == "d/model.pdiparams"


# ---- the driver and prepare.sh on stub scripts ------------------------------------------------

STUB = '''\
"""Stub of {name}: records its argv, creates what the real script would, fails on request."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
args = {{a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}}
with open(Path(__file__).with_name("calls.jsonl"), "a") as f:
    f.write(json.dumps({{"script": "{name}", "argv": argv,
                         "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
fail_on = os.environ.get("STUB_FAIL", "")
if fail_on and fail_on in " ".join(["{name}"] + argv):
    sys.exit("stub asked to fail")
'''
STUB_ACTIONS = {
    "train.py": '''
folder = Path(args["--save_path"]) / f'{args["--method"]}_{args["--arch"]}_{args["--k"]}'
folder.mkdir(parents=True, exist_ok=True)
(folder / f'{args["--category"]}.npz').write_bytes(b"stub")
''',
    "eval.py": '''
assert Path(args["--model_path"]).is_dir(), "no model folder"
''',
    "export_model.py": '''
assert Path(args["--model_path"]).is_file(), "no checkpoint"
out = Path(args["--save_dir"]); out.mkdir(parents=True, exist_ok=True)
for name in ("model.json", "model.pdiparams", "deploy.json"):
    (out / name).write_text("{}")
''',
    "infer.py": '''
assert Path(args["--model_file"]).is_file() and Path(args["--params_file"]).is_file()
assert Path(args["--input_file"]).exists(), "no input"
''',
}


@pytest.fixture
def stub_repo(tmp_path):
    """A copy of test_tipc/ in a fake repository whose scripts are stubs; config StubAD."""
    (tmp_path / "test_tipc").mkdir()
    for name in ("common_func.sh", "prepare.sh", "test_train_inference_python.sh"):
        shutil.copy(TIPC / name, tmp_path / "test_tipc" / name)
    for name, action in STUB_ACTIONS.items():
        (tmp_path / name).write_text(STUB.format(name=name) + action)
    config_dir = tmp_path / "test_tipc" / "configs" / "StubAD"
    config_dir.mkdir(parents=True)
    text = CONFIGS["OrthoAD"][1].read_text()
    text = text.replace("model_name:OrthoAD", "model_name:StubAD")
    text = text.replace("python:python", f"python:{sys.executable}")
    (config_dir / "train_infer_python.txt").write_text(text)
    data = tmp_path / "test_tipc" / "data"
    for folder in ("lite_infer", "whole_infer"):
        (data / folder).mkdir(parents=True)
        (data / folder / "good_000.png").write_bytes(b"")
    model = data / "whole_model" / "ortho_resnet18_100" / "magnetic_tile.npz"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"stub")
    return tmp_path


def run_driver(repo: Path, mode: str, cuda: str = "False", fail: str = "", *extra: str
               ) -> tuple[subprocess.CompletedProcess, list[str], list[dict]]:
    env = dict(os.environ, TIPC_HAS_CUDA=cuda, STUB_FAIL=fail)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        ["bash", str(repo / "test_tipc" / "test_train_inference_python.sh"),
         "test_tipc/configs/StubAD/train_infer_python.txt", mode, *extra],
        capture_output=True, text=True, cwd=repo, env=env, timeout=120)
    results = repo / "test_tipc" / "output" / "StubAD" / mode / "results_python.log"
    calls_file = repo / "calls.jsonl"
    calls = [json.loads(x) for x in calls_file.read_text().splitlines()] if calls_file.exists() \
        else []
    return result, results.read_text().splitlines(), calls


def kinds(lines: list[str]) -> list[str]:
    return [line.split(" with command")[0] for line in lines]


@needs_bash
def test_driver_lite_chain_on_a_cpu_build(stub_repo):
    result, lines, calls = run_driver(stub_repo, "lite_train_lite_infer")
    assert result.returncode == 0, result.stderr
    scripts = [c["script"] for c in calls]
    assert scripts == ["train.py", "eval.py", "export_model.py"] + ["infer.py"] * 4
    no_cuda = "Skipped (Paddle is not compiled with CUDA)"
    # train, eval, export; use_gpu True (skipped), False (4 combinations); the GPU training
    assert kinds(lines) == ["Run successfully"] * 3 + [no_cuda] + ["Run successfully"] * 4 \
        + [no_cuda[:-1] + "; its eval, export and inference too)"]
    train = flags(" ".join(calls[0]["argv"]))
    assert train["--pretrained"] == "none" and train["--resize"] == "64"
    assert train["--device"] == "cpu" and train["--category"] == "tiles"
    assert train["--data_path"] == "./test_tipc/data/lite"
    save = "./test_tipc/output/StubAD/lite_train_lite_infer/norm_train_gpus_-1_autocast_null"
    assert train["--save_path"] == save
    assert flags(" ".join(calls[1]["argv"]))["--model_path"] == f"{save}/ortho_resnet18_100"
    export = flags(" ".join(calls[2]["argv"]))
    assert export["--model_path"] == f"{save}/ortho_resnet18_100/tiles.npz"
    assert export["--save_dir"] == f"{save}/inference" and export["--img_size"] == "64"
    combos = set()
    for call in calls[3:]:
        f = flags(" ".join(call["argv"]))
        assert f["--use_gpu"] == "False" and f["--batch_size"] == "1"
        assert f["--model_file"] == f"{save}/inference/model.json"
        assert f["--params_file"] == f"{save}/inference/model.pdiparams"
        assert f["--input_file"] == "./test_tipc/data/lite_infer"
        assert f["--enable_benchmark"] == "True"
        tag = f'python_infer_cpu_gpus_-1_usemkldnn_{f["--enable_mkldnn"]}_threads_{f["--cpu_threads"]}' \
            "_precision_fp32_batchsize_1"
        assert f["--save_path"] == f"./test_tipc/output/StubAD/lite_train_lite_infer/infer_results/{tag}"
        combos.add((f["--enable_mkldnn"], f["--cpu_threads"]))
    assert combos == {("True", "1"), ("True", "2"), ("False", "1"), ("False", "2")}
    log_dir = stub_repo / "test_tipc" / "output" / "StubAD" / "lite_train_lite_infer"
    assert (log_dir / "norm_train_gpus_-1_autocast_null.log").is_file()
    assert (log_dir / "python_infer_cpu_gpus_-1_usemkldnn_True_threads_2_precision_fp32_"
            "batchsize_1.log").is_file()


@needs_bash
def test_driver_records_failures_and_still_exits_zero(stub_repo):
    result, lines, _ = run_driver(stub_repo, "lite_train_lite_infer", "False",
                                  "--enable_mkldnn False --cpu_threads 2")
    assert result.returncode == 0
    failed = [line for line in lines if line.startswith("Run failed")]
    assert len(failed) == 1 and "--enable_mkldnn False --cpu_threads 2" in failed[0]
    assert "stub asked to fail" in result.stdout  # the end of the failing log is printed
    assert "6 successful, 1 failed, 2 skipped" in result.stdout


@needs_bash
def test_driver_skips_inference_when_the_export_fails(stub_repo):
    result, lines, calls = run_driver(stub_repo, "lite_train_lite_infer", "False", "export_model.py")
    assert result.returncode == 0
    assert "infer.py" not in [c["script"] for c in calls]
    assert kinds(lines)[:4] == ["Run successfully", "Run successfully", "Run failed",
                                "Skipped (export failed)"]


@needs_bash
def test_driver_on_a_cuda_build_runs_the_gpu_entries(stub_repo):
    result, lines, calls = run_driver(stub_repo, "lite_train_lite_infer", "True")
    assert result.returncode == 0
    assert set(kinds(lines)) == {"Run successfully"}
    # per training run: train, eval, export, 4 CPU + 1 GPU inference; two training runs
    assert len(lines) == 2 * 8
    gpu_train = [c for c in calls if c["script"] == "train.py" and c["cuda"] == "0"]
    assert len(gpu_train) == 1 and flags(" ".join(gpu_train[0]["argv"]))["--device"] == "gpu"
    gpu_infer = [flags(" ".join(c["argv"])) for c in calls if c["script"] == "infer.py"
                 and "--use_gpu True" in " ".join(c["argv"])]
    assert len(gpu_infer) == 2
    assert all(f["--use_tensorrt"] == "False" and "--enable_mkldnn" not in f for f in gpu_infer)


@needs_bash
def test_driver_whole_infer_exports_the_prepared_model(stub_repo):
    result, lines, calls = run_driver(stub_repo, "whole_infer")
    assert result.returncode == 0
    assert [c["script"] for c in calls] == ["export_model.py"] + ["infer.py"] * 4
    export = flags(" ".join(calls[0]["argv"]))
    assert export["--model_path"] == "./test_tipc/data/whole_model/ortho_resnet18_100/" \
        "magnetic_tile.npz"
    assert export["--img_size"] == "256"
    assert all(flags(" ".join(c["argv"]))["--input_file"] == "./test_tipc/data/whole_infer"
               for c in calls[1:])
    assert kinds(lines) == ["Run successfully", "Skipped (Paddle is not compiled with CUDA)"] \
        + ["Run successfully"] * 4


@needs_bash
def test_driver_rejects_a_wrong_invocation(stub_repo):
    script = str(stub_repo / "test_tipc" / "test_train_inference_python.sh")
    config = "test_tipc/configs/StubAD/train_infer_python.txt"
    for args in ([], [config], [config, "lite"], ["missing.txt", "whole_infer"]):
        result = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                                cwd=stub_repo, timeout=60)
        assert result.returncode == 2 and "usage:" in result.stderr


@needs_bash
def test_prepare_whole_modes_fail_clearly_without_the_dataset(stub_repo):
    env = dict(os.environ, TIPC_MAGNETIC_TILE_SRC=str(stub_repo / "no_such_folder"))
    for mode in ("whole_infer", "whole_train_whole_infer"):
        result = subprocess.run(
            ["bash", str(stub_repo / "test_tipc" / "prepare.sh"),
             "test_tipc/configs/StubAD/train_infer_python.txt", mode],
            capture_output=True, text=True, cwd=stub_repo, env=env, timeout=60)
        assert result.returncode == 1
        assert "magnetic-tile dataset" in result.stderr and "no_such_folder" in result.stderr
        assert not (stub_repo / "test_tipc" / "data" / "whole").exists()


@needs_bash
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    scripts = [str(TIPC / n) for n in ("common_func.sh", "prepare.sh",
                                       "test_train_inference_python.sh")]
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout


@needs_bash
def test_scripts_parse():
    for name in ("common_func.sh", "prepare.sh", "test_train_inference_python.sh"):
        result = subprocess.run(["bash", "-n", str(TIPC / name)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
