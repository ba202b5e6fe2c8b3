"""Tests of test_tipc/: the config parser in common_func.sh, the four configs, and the driver's logic.

The configs must run under Paddle's generic TIPC driver (the test_train_inference_python.sh that
PaddleOCR and the paper reproductions share). That driver is not part of this repository:
``STANDARD_LINES`` and ``standard_commands`` below restate, as data and a few lines of Python, which
line it reads for what and the commands it builds; the configs are checked against that, the
commands are parsed by our scripts' own parsers, and our driver must build the same commands.

The bash helpers are called through ``bash -c 'source test_tipc/common_func.sh; ...'``. The driver
and prepare.sh are exercised on a throw-away copy of test_tipc/ whose train.py, eval.py,
export_model.py and infer.py are stubs that record their arguments, so these tests take seconds.
The real chain (prepare.sh + the driver on the real scripts) runs in CI (.ci/run, lite mode).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import config_from

ROOT = Path(__file__).resolve().parents[1]
TIPC = ROOT / "test_tipc"
COMMON = TIPC / "common_func.sh"
MODES = ("lite_train_lite_infer", "lite_train_whole_infer", "whole_infer", "whole_train_whole_infer")
METHOD_OF = {"OrthoAD": "ortho", "PaDiM": "padim", "SPADE": "spade", "PatchCore": "patchcore",
             "CutPaste": "cutpaste", "EfficientAD": "efficientad", "PUAD": "puad"}
CONFIGS = {name: (method, TIPC / "configs" / name / "train_infer_python.txt")
           for name, method in METHOD_OF.items()}

# How the standard driver reads train_infer_python.txt: 0-based line index -> (its variable, what
# it takes from the line): "key" = the text before the first ':', "value" = the text after it (up
# to a second ':'), "mode" = the value's "MODE=value" entry for the running mode (nothing if the
# mode is not listed); only what goes into its commands is listed. It reads the first 51 lines
# and drops empty lines before indexing.
STANDARD_LINES: dict[int, tuple[str, str]] = {
    1: ("model_name", "value"), 2: ("python", "value"), 3: ("gpu_list", "value"),
    4: ("train_use_gpu", "key value"), 5: ("autocast", "key value"), 6: ("epoch", "key mode"),
    7: ("save_model", "key"), 8: ("train_batch", "key mode"), 9: ("pretrain_model", "key value"),
    10: ("train_model_name", "value"), 11: ("train_infer_img_dir", "value"),
    12: ("train_param1", "key value"),
    14: ("trainer_list", "value"), 15: ("norm_train", "value"), 16: ("pact_train", "key value"),
    17: ("fpgm_train", "key value"), 18: ("distill_train", "key value"),
    19: ("trainer1", "key value"), 20: ("trainer2", "key value"),
    23: ("eval_py", "value"), 24: ("eval_param1", "key value"),
    27: ("save_infer", "key"), 28: ("export_weight", "key"), 29: ("norm_export", "value"),
    30: ("pact_export", "value"), 31: ("fpgm_export", "value"), 32: ("distill_export", "value"),
    33: ("export1", "value"), 34: ("export2", "value"), 35: ("inference_dir", "value"),
    36: ("infer_model_list", "value"), 37: ("infer_export_list", "value"),
    38: ("infer_quant_list", "value"), 39: ("inference_py", "value"),
    40: ("use_gpu", "key value"), 41: ("use_mkldnn", "key value"), 42: ("cpu_threads", "key value"),
    43: ("infer_batch", "key value"), 44: ("use_trt", "key value"), 45: ("precision", "key value"),
    46: ("infer_model_key", "key"), 47: ("image_dir", "key value"), 48: ("save_log", "key"),
    49: ("benchmark", "key value"), 50: ("infer_param1", "key value"),
}
STANDARD_LENGTH = 51
SEPARATORS = {0: "train_params", 13: "##", 21: "##", 22: "eval_params", 25: "##", 26: "infer_params"}
MODE_LINES = (6, 8)  # the only lines the standard driver reads per mode

# Our configs: the key on each line the standard driver reads (0-based, as STANDARD_LINES).
OUR_KEYS = {
    1: "model_name", 2: "python", 3: "gpu_list", 4: "--device", 5: "auto_cast", 6: "null",
    7: "--save_path", 8: "--batch_size", 9: "--model_path", 10: "train_model_name",
    11: "train_infer_img_dir", 12: "null", 14: "trainer", 15: "norm_train", 16: "pact_train",
    17: "fpgm_train", 18: "distill_train", 19: "null", 20: "null", 23: "eval", 24: "null",
    27: "--save_dir", 28: "--model_path", 29: "norm_export", 30: "quant_export",
    31: "fpgm_export", 32: "distill_export", 33: "null", 34: "null", 35: "inference_dir",
    36: "infer_model", 37: "infer_export", 38: "infer_quant", 39: "inference", 40: "--use_gpu",
    41: "--enable_mkldnn", 42: "--cpu_threads", 43: "--batch_size", 44: "--use_tensorrt",
    45: "--precision", 46: "--model_file", 47: "--input_file", 48: "--save_path",
    49: "--enable_benchmark", 50: "null",
}

STEP_KEY = {"EfficientAD": "--steps", "PUAD": "--steps"}
"""Configs whose line 7 (the standard driver's per-mode epoch line) gives the step budget."""

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
    ("--use_gpu", "True", "--use_gpu=True"),
    ("--data_path", "./test_tipc/data/lite", "--data_path=./test_tipc/data/lite"),
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

def std_key(line: str) -> str:
    return line.split(":")[0]


def std_value(line: str) -> str:
    parts = line.split(":")
    return parts[1] if len(parts) > 1 else ""


def std_mode_value(line: str, mode: str) -> str:
    for entry in std_value(line).split("|"):
        parts = entry.split("=")
        if parts[0] == mode:
            return parts[1] if len(parts) > 1 else ""
    return ""


def std_set(key: str, value: str) -> list[str]:
    """The standard driver's argument: ["KEY=VALUE"], or nothing for a null key or value."""
    return [] if key == "null" or value.strip() in ("", "null") else [f"{key}={value}"]


def standard_lines(path: Path) -> list[str]:
    """The lines as the standard driver indexes them: first 51, empty lines dropped."""
    return [line for line in path.read_text().split("\n")[:STANDARD_LENGTH] if line]


def standard_commands(path: Path, mode: str) -> list[list[str]]:
    """argv (after the interpreter) of the CPU commands the standard driver runs for ``mode``.

    Training modes, gpu_list entry -1: train, eval, export, then one inference per CPU combination
    of oneDNN x threads x batch x precision. whole_infer: per infer_model, its export (unless
    infer_export is null) and the same inferences. The log folder is test_tipc/output/<model>/<mode>.
    """
    lines = standard_lines(path)
    k = {i: std_key(line) for i, line in enumerate(lines)}
    v = {i: std_value(line) for i, line in enumerate(lines)}
    log_path = f"./test_tipc/output/{v[1]}/{mode}"

    def inference(model_dir_: str, img_dir: str) -> list[list[str]]:
        runs = []
        for mkldnn in v[41].split("|"):
            for threads in v[42].split("|"):
                for batch in v[43].split("|"):
                    for precision in v[45].split("|"):
                        if precision == "fp16" and mkldnn == "False":
                            continue
                        runs.append([v[39], f"{k[40]}=False", *std_set(k[41], mkldnn),
                                     *std_set(k[42], threads), *std_set(k[46], model_dir_),
                                     *std_set(k[43], batch), *std_set(k[47], img_dir),
                                     *std_set(k[49], v[49]), *std_set(k[45], precision),
                                     *std_set(k[50], v[50])])
        return runs

    if mode == "whole_infer":
        commands = []
        for model, export in zip(v[36].split("|"), v[37].split("|"), strict=True):
            if export != "null":
                commands.append([*export.split(), *std_set(k[28], model), *std_set(k[27], model)])
            commands += inference(model, v[47])
        return commands
    device = v[4].split("|")[v[3].split("|").index("-1")]
    save_log = f"{log_path}/{v[14].split('|')[0]}_gpus_-1_autocast_{v[5].split('|')[0]}"
    trained = f"{save_log}/{v[10]}"
    train = [*v[15].split(), *std_set(k[4], device), *std_set(k[7], save_log),
             *std_set(k[6], std_mode_value(lines[6], mode)), *std_set(k[9], v[9]),
             *std_set(k[5], v[5].split("|")[0]), *std_set(k[8], std_mode_value(lines[8], mode)),
             *std_set(k[12], v[12])]
    evaluate = [*v[23].split(), *std_set(k[9], trained), *std_set(k[4], device),
                *std_set(k[24], v[24])]
    export = [*v[29].split(), *std_set(k[28], trained), *std_set(k[27], save_log)]
    return [train, evaluate, export, *inference(save_log, v[11])]


def flags(argv: list[str]) -> dict[str, str]:
    """--key value and --key=value pairs of an argv."""
    out: dict[str, str] = {}
    for i, word in enumerate(argv):
        if word.startswith("--") and "=" in word:
            out[word.split("=", 1)[0]] = word.split("=", 1)[1]
        elif word.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[word] = argv[i + 1]
    return out


def test_every_config_folder_is_checked():
    """CI runs every folder of test_tipc/configs: each must be one of the configs checked here."""
    folders = {path.parent.name for path in (TIPC / "configs").glob("*/train_infer_python.txt")}
    assert folders == set(CONFIGS)


def test_the_line_maps_cover_the_layout():
    """Every line of the layout is a separator, a line the standard driver reads, or both maps agree."""
    assert set(STANDARD_LINES) | set(SEPARATORS) == set(range(STANDARD_LENGTH))
    assert not set(STANDARD_LINES) & set(SEPARATORS)
    assert set(OUR_KEYS) == set(STANDARD_LINES)
    # the 1-based landmarks: trainer on 15, eval header 23, infer header 27, inference 40,
    # --use_gpu .. benchmark on 41-50
    assert STANDARD_LINES[14][0] == "trainer_list" and SEPARATORS[22] == "eval_params"
    assert SEPARATORS[26] == "infer_params" and STANDARD_LINES[39][0] == "inference_py"
    assert STANDARD_LINES[40][0] == "use_gpu" and STANDARD_LINES[49][0] == "benchmark"


@needs_bash
def test_our_line_map_is_the_standard_one():
    """common_func.sh's TIPC_LINE_MAP reads the lines STANDARD_LINES lists, each the same way."""
    entries = out('printf "%s\\n" "${TIPC_LINE_MAP[@]}"').split("\n")
    ours = {}
    for entry in entries:
        index, key_var, value_var = entry.split()
        parts = ([] if key_var == "-" else ["key"]) + (
            [] if value_var == "-" else ["mode" if value_var.endswith("*") else "value"])
        ours[int(index)] = " ".join(parts)
    expected = {index: how for index, (_, how) in STANDARD_LINES.items()}
    expected[48] = "key value"  # ours also takes the value: the inference output folder
    assert ours == expected


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_config_is_in_the_standard_layout(model):
    _, path = CONFIGS[model]
    raw = path.read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n")
    text_lines = raw.decode().split("\n")[:-1]
    assert len(text_lines) == STANDARD_LENGTH
    assert all(line and line == line.strip() for line in text_lines)  # no empty line moves others
    assert standard_lines(path) == text_lines
    for index, text in SEPARATORS.items():
        line = text_lines[index]
        assert line == "##" if text == "##" else (line.startswith("=====") and text in line)
    for index, key in OUR_KEYS.items():
        line = text_lines[index]
        if index == 6:  # the per-mode training length: a step budget for the trained methods
            key = STEP_KEY.get(model, key)
        assert std_key(line) == key, f"line {index + 1}"
        assert line.count(":") == 1, f"line {index + 1}: a second ':' would cut the value"
        per_mode = any(f"{m}=" in std_value(line) for m in MODES)
        assert per_mode == (index in MODE_LINES and std_value(line) != "null"), f"line {index + 1}"
    assert std_value(text_lines[1]) == model
    for mode in MODES:  # the batch line gives every mode a value
        assert std_mode_value(text_lines[8], mode).isdigit()


@needs_bash
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_our_parser_reads_each_line_as_the_standard_driver(model):
    _, path = CONFIGS[model]
    script = ('func_read_config "$1" ls; for l in "${ls[@]}"; do '
              'printf "%s\\t%s\\n" "$(func_parser_key "$l")" "$(func_parser_value "$l")"; done')
    ours = [tuple(line.split("\t", 1)) for line in out(script, str(path)).split("\n")]
    assert ours == [(std_key(line), std_value(line)) for line in standard_lines(path)]
    for mode in MODES:
        for index in MODE_LINES:
            got = out('func_read_config "$1" ls; func_parser_params "${ls[$2]}" "$3"',
                      str(path), str(index), mode)
            assert (got if got != "null" else "") == std_mode_value(standard_lines(path)[index], mode)


@pytest.mark.parametrize("model", sorted(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_standard_driver_commands_are_accepted_by_our_scripts(model, mode):
    """The standard driver's commands parse with our CLIs and fit together: eval and export get the
    checkpoint train.py writes, inference gets the export folder, sizes agree."""
    import eval as eval_script
    import export_model
    import infer
    import train as train_script

    method, path = CONFIGS[model]
    commands = standard_commands(path, mode)
    inferences = [c for c in commands if c[0] == "infer.py"]
    assert len(inferences) == 4
    if mode == "whole_infer":
        assert [c[0] for c in commands] == ["infer.py"] * 4  # infer_export null: prepared export
        model_folder = f"./test_tipc/data/whole_model/{model}"
        img_dir = "./test_tipc/data/infer_data"
    else:
        train_argv, eval_argv, export_argv = commands[:3]
        assert (train_argv[0], eval_argv[0], export_argv[0]) == ("train.py", "eval.py", "export_model.py")
        train = train_script.parse_args(train_argv[1:])
        assert train.method == method and train.pretrained == "none" and train.device == "cpu"
        assert train.batch_size == (4 if mode.startswith("lite_train") else 32)
        written = Path(train.save_path) / config_from(train).run_name / f"{train.category}.npz"
        evaluate = eval_script.parse_args(eval_argv[1:])
        assert Path(evaluate.model_path) == written  # eval reads what train wrote
        assert (evaluate.method, evaluate.arch, evaluate.k, evaluate.resize, evaluate.data_path,
                evaluate.category) == (train.method, train.arch, train.k, train.resize,
                                       train.data_path, train.category)
        export = export_model.parse_args(export_argv[1:])
        assert Path(export.model_path) == written and export.img_size == train.resize
        assert (export.method, export.arch) == (train.method, train.arch)
        assert export.k == train.k
        model_folder = export.save_dir
        img_dir = "./test_tipc/data/infer_data"
        assert train.data_path == "./test_tipc/data/train_data" and train.category == "tile"
    combos = set()
    for argv in inferences:
        args = infer.parse_args(argv[1:])
        assert args.model_file == model_folder and args.input_file == img_dir
        assert args.use_gpu is False and args.enable_benchmark is True and args.batch_size == 1
        combos.add((args.enable_mkldnn, args.cpu_threads))
    assert combos == {(True, 1), (True, 2), (False, 1), (False, 2)}


# ---- the driver and prepare.sh on stub scripts ------------------------------------------------

STUB = '''\
"""Stub of {name}: records its argv, creates what the real script would, fails on request."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
args = {{}}
for i, a in enumerate(argv):
    if a.startswith("--") and "=" in a:
        args[a.split("=", 1)[0]] = a.split("=", 1)[1]
    elif a.startswith("--") and i + 1 < len(argv):
        args[a] = argv[i + 1]
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
assert Path(args["--model_path"]).is_file(), "no checkpoint"
''',
    "export_model.py": '''
assert Path(args["--model_path"]).is_file(), "no checkpoint"
out = Path(args["--save_dir"]); out.mkdir(parents=True, exist_ok=True)
for name in ("model.json", "model.pdiparams", "deploy.json"):
    (out / name).write_text("{}")
''',
    "infer.py": '''
assert (Path(args["--model_file"]) / "deploy.json").is_file(), "no export folder"
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
    text = text.replace("whole_model/OrthoAD", "whole_model/StubAD")
    (config_dir / "train_infer_python.txt").write_text(text)
    data = tmp_path / "test_tipc" / "data"
    (data / "infer_data").mkdir(parents=True)
    (data / "infer_data" / "good_000.png").write_bytes(b"")
    export = data / "whole_model" / "StubAD"
    export.mkdir(parents=True)
    (export / "deploy.json").write_text("{}")
    return tmp_path


def stub_config(repo: Path) -> Path:
    return repo / "test_tipc" / "configs" / "StubAD" / "train_infer_python.txt"


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


def without_save_path(argv: list[str]) -> list[str]:
    """An argv without the inference --save_path our driver adds (the standard driver passes none)."""
    return [word for word in argv if not (word.startswith("--save_path=") and "/infer_results/" in word)]


@needs_bash
@pytest.mark.parametrize("mode", MODES)
def test_driver_runs_the_commands_of_the_standard_driver(stub_repo, mode):
    """On a CPU build, our driver runs exactly the standard driver's CPU commands, in its order."""
    result, lines, calls = run_driver(stub_repo, mode)
    assert result.returncode == 0, result.stderr
    expected = standard_commands(stub_config(stub_repo), mode)
    assert [[c["script"], *without_save_path(c["argv"])] for c in calls] == expected
    assert "Run failed" not in kinds(lines)
    assert kinds(lines).count("Run successfully") == len(expected)


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
    train = flags(calls[0]["argv"])
    save = "./test_tipc/output/StubAD/lite_train_lite_infer/norm_train_gpus_-1_autocast_null"
    assert train == {"--method": "ortho", "--arch": "resnet18", "--k": "100", "--seed": "0",
                     "--pretrained": "none", "--data_path": "./test_tipc/data/train_data",
                     "--category": "tile", "--resize": "128", "--num_workers": "0",
                     "--device": "cpu", "--save_path": save, "--batch_size": "4"}
    checkpoint = f"{save}/ortho_resnet18_100/tile.npz"
    assert flags(calls[1]["argv"])["--model_path"] == checkpoint
    export = flags(calls[2]["argv"])
    assert export["--model_path"] == checkpoint and export["--save_dir"] == save
    for call in calls[3:]:
        f = flags(call["argv"])
        tag = f'python_infer_cpu_gpus_-1_usemkldnn_{f["--enable_mkldnn"]}_threads_{f["--cpu_threads"]}' \
            "_precision_fp32_batchsize_1"
        assert f["--save_path"] == f"./test_tipc/output/StubAD/lite_train_lite_infer/infer_results/{tag}"
    log_dir = stub_repo / "test_tipc" / "output" / "StubAD" / "lite_train_lite_infer"
    assert (log_dir / "norm_train_gpus_-1_autocast_null.log").is_file()
    assert (log_dir / "python_infer_cpu_gpus_-1_usemkldnn_True_threads_2_precision_fp32_"
            "batchsize_1.log").is_file()


@needs_bash
def test_driver_records_failures_and_still_exits_zero(stub_repo):
    result, lines, _ = run_driver(stub_repo, "lite_train_lite_infer", "False",
                                  "--enable_mkldnn=False --cpu_threads=2")
    assert result.returncode == 0
    failed = [line for line in lines if line.startswith("Run failed")]
    assert len(failed) == 1 and "--enable_mkldnn=False --cpu_threads=2" in failed[0]
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
    assert len(gpu_train) == 1 and flags(gpu_train[0]["argv"])["--device"] == "gpu"
    gpu_infer = [flags(c["argv"]) for c in calls if c["script"] == "infer.py"
                 and "--use_gpu=True" in c["argv"]]
    assert len(gpu_infer) == 2
    assert all(f["--use_tensorrt"] == "False" and "--enable_mkldnn" not in f for f in gpu_infer)


@needs_bash
def test_driver_whole_infer_runs_the_prepared_export(stub_repo):
    result, lines, calls = run_driver(stub_repo, "whole_infer", "False", "", "3")
    assert result.returncode == 0
    assert [c["script"] for c in calls] == ["infer.py"] * 4  # infer_export null: no export
    assert {flags(c["argv"])["--model_file"] for c in calls} == {"./test_tipc/data/whole_model/StubAD"}
    assert {c["cuda"] for c in calls} == {"3"}  # GPUID
    assert kinds(lines) == ["Skipped (Paddle is not compiled with CUDA)"] + ["Run successfully"] * 4


@needs_bash
@pytest.mark.parametrize(("cut", "message"), [
    ((50, 51, None), "50 lines, the standard layout has 51"),
    ((20, 21, ""), "line 21 is empty"),
    ((22, 23, "null:null"), "section headers must be on lines 1, 23 and 27"),
])
def test_driver_and_prepare_reject_a_config_off_the_layout(stub_repo, cut, message):
    config = stub_config(stub_repo)
    lines = config.read_text().split("\n")[:-1]
    start, stop, replacement = cut
    lines[start:stop] = [] if replacement is None else [replacement]
    config.write_text("\n".join(lines) + "\n")
    for script in ("test_train_inference_python.sh", "prepare.sh"):
        result = subprocess.run(["bash", str(stub_repo / "test_tipc" / script), str(config),
                                 "lite_train_lite_infer"], capture_output=True, text=True,
                                cwd=stub_repo, timeout=60)
        assert result.returncode == 2 and message in result.stderr, script


@needs_bash
def test_driver_rejects_a_wrong_invocation(stub_repo):
    script = str(stub_repo / "test_tipc" / "test_train_inference_python.sh")
    config = "test_tipc/configs/StubAD/train_infer_python.txt"
    for args in ([], [config], [config, "lite"], ["missing.txt", "whole_infer"]):
        result = subprocess.run(["bash", script, *args], capture_output=True, text=True,
                                cwd=stub_repo, timeout=60)
        assert result.returncode == 2 and "usage:" in result.stderr


DATASET_STUB = '''\
"""Stub of datasets.{name}: writes a tiny MVTec-layout category {category} under --dst."""
import sys
from pathlib import Path

argv = sys.argv[1:]
dst = Path(argv[argv.index("--dst") + 1]) / "{category}"
for folder in ("train/good", "test/good", "test/crack"):
    (dst / folder).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        (dst / folder / f"{{i:03d}}.png").write_bytes(b"")
'''


def add_dataset_stubs(repo: Path) -> None:
    (repo / "datasets").mkdir()
    (repo / "datasets" / "__init__.py").write_text("")
    for name, category in (("synthetic", "tiles"), ("magnetic_tile", "magnetic_tile")):
        (repo / "datasets" / f"{name}.py").write_text(DATASET_STUB.format(name=name, category=category))


def run_prepare(repo: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TIPC_HAS_CUDA="False", TIPC_MAGNETIC_TILE_SRC=str(repo))
    return subprocess.run(["bash", str(repo / "test_tipc" / "prepare.sh"),
                           "test_tipc/configs/StubAD/train_infer_python.txt", mode],
                          capture_output=True, text=True, cwd=repo, env=env, timeout=120)


@needs_bash
@pytest.mark.parametrize(("mode", "dataset", "images"), [
    ("lite_train_lite_infer", "lite/tiles", ["crack_000.png", "crack_001.png", "good_000.png",
                                             "good_001.png"]),
    ("lite_train_whole_infer", "lite/tiles", ["crack_000.png", "crack_001.png", "good_000.png",
                                              "good_001.png"]),
    ("whole_train_whole_infer", "whole/magnetic_tile", ["crack_000.png", "crack_001.png",
                                                        "good_000.png", "good_001.png"]),
])
def test_prepare_points_the_fixed_paths_at_the_mode_data(stub_repo, mode, dataset, images):
    add_dataset_stubs(stub_repo)
    data = stub_repo / "test_tipc" / "data"
    shutil.rmtree(data / "infer_data")
    result = run_prepare(stub_repo, mode)
    assert result.returncode == 0, result.stderr
    link = data / "train_data" / "tile"  # --data_path/--category of the config's train line
    assert link.is_symlink() and link.resolve() == (data / dataset).resolve()
    assert sorted(p.name for p in (data / "infer_data").iterdir()) == images
    assert not (stub_repo / "calls.jsonl").exists()  # no model fitted outside whole_infer


@needs_bash
def test_prepare_switches_the_data_between_modes(stub_repo):
    add_dataset_stubs(stub_repo)
    link = stub_repo / "test_tipc" / "data" / "train_data" / "tile"
    for mode, dataset in (("whole_train_whole_infer", "magnetic_tile"),
                          ("lite_train_lite_infer", "tiles")):
        assert run_prepare(stub_repo, mode).returncode == 0
        assert link.resolve().name == dataset


@needs_bash
def test_prepare_whole_infer_fits_and_exports_the_model_once(stub_repo):
    add_dataset_stubs(stub_repo)
    model = stub_repo / "test_tipc" / "data" / "whole_model" / "StubAD"
    shutil.rmtree(model)
    result = run_prepare(stub_repo, "whole_infer")
    assert result.returncode == 0, result.stderr
    calls = [json.loads(x) for x in (stub_repo / "calls.jsonl").read_text().splitlines()]
    assert [c["script"] for c in calls] == ["train.py", "export_model.py"]
    folder = "./test_tipc/data/whole_model/StubAD"
    train, export = flags(calls[0]["argv"]), flags(calls[1]["argv"])
    assert (train["--save_path"], train["--batch_size"], train["--device"]) == (folder, "32", "cpu")
    assert train["--data_path"] == "./test_tipc/data/train_data" and train["--category"] == "tile"
    assert export["--model_path"] == f"{folder}/ortho_resnet18_100/tile.npz"
    assert export["--save_dir"] == folder and (model / "deploy.json").is_file()
    assert run_prepare(stub_repo, "whole_infer").returncode == 0  # already there: not refitted
    assert len((stub_repo / "calls.jsonl").read_text().splitlines()) == 2


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
