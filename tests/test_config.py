"""Config: the original's defaults, command-line parsing and its errors, the toy preset, checkpoint dicts."""

import dataclasses
import json
import os
import warnings

import pytest

from utils.config import TOY_PRESET, Config, ConfigError, opt

FLAGS = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)]


def test_defaults_are_the_originals():
    c = Config()
    original = {
        "min_size": 600, "max_size": 1000, "num_workers": 8, "test_num_workers": 8, "rpn_sigma": 3.0,
        "roi_sigma": 1.0, "weight_decay": 5e-4, "lr_decay": 0.1, "lr": 1e-3, "env": "faster-rcnn",
        "port": 8097, "plot_every": 40, "data": "voc", "epoch": 14, "use_adam": False, "use_drop": False,
        "test_num": 10000, "load_path": None, "caffe_pretrain": False,
        "caffe_pretrain_path": "checkpoints/vgg16_caffe.pth",
        # constants of the original's code that became options
        "lr_decay_epoch": 9, "ratios": (0.5, 1.0, 2.0), "anchor_scales": (8.0, 16.0, 32.0),
        "rpn_nms_thresh": 0.7, "n_train_pre_nms": 12000, "n_train_post_nms": 2000, "n_test_pre_nms": 6000,
        "n_test_post_nms": 300, "proposal_min_size": 16.0, "backbone": "vgg16",
        "visdom_server": "http://localhost", "run_name": "",
    }
    assert {key: getattr(c, key) for key in original} == original
    assert not any(hasattr(c, dead) for dead in ("use_chainer", "debug_file", "pretrained_model"))
    assert opt == Config()


def test_unknown_option_names_it_suggests_the_closest_and_lists_all():
    with pytest.raises(ConfigError) as info:
        Config.parse({"plot_evry": 100})
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "--plot-evry" in message and "did you mean --plot-every?" in message
    assert all(flag in message for flag in FLAGS)


def test_unknown_option_without_a_close_match_gives_no_suggestion():
    with pytest.raises(ConfigError, match="unknown option --xyzzy. Valid options: --data") as info:
        Config.parse({"xyzzy": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(("key", "value", "expected_type"), [
    ("epoch", "abc", "int"),
    ("epoch", 1.5, "int"),
    ("epoch", True, "int"),
    ("lr", "fast", "float"),
    ("lr", "nan", "float"),
    ("use_adam", "maybe", "bool"),
    ("use_adam", 2, "bool"),
    ("seed", "x", "int|None"),
    ("ratios", "0.5,one", "float,..."),
    ("load_path", True, "str|None"),
    ("env", [1], "str"),
])
def test_wrong_type_names_the_option_the_type_and_the_value(key, value, expected_type):
    with pytest.raises(ConfigError) as info:
        Config.parse({key: value})
    message = str(info.value)
    assert "--" + key.replace("_", "-") in message
    assert f"expects {expected_type}," in message
    assert repr(value) in message


@pytest.mark.parametrize(("key", "value", "name", "expected"), [
    ("plot-every", "100", "plot_every", 100),            # hyphens, a string from a command line
    ("--plot_every", 100, "plot_every", 100),
    ("lr", 1, "lr", 1.0),                                # ints for floats
    ("lr", "1e-3", "lr", 1e-3),
    ("epoch", 3.0, "epoch", 3),
    ("use_adam", True, "use_adam", True),                # fire's bare --use-adam
    ("use-Adam", "yes", "use_adam", True),               # the original README's spelling
    ("caffe_pretrain", "false", "caffe_pretrain", False),
    ("caffe_pretrain", 1, "caffe_pretrain", True),
    ("ratios", "0.5,1,2", "ratios", (0.5, 1.0, 2.0)),    # a string
    ("ratios", (0.5, 1, 2), "ratios", (0.5, 1.0, 2.0)),  # what fire makes of --ratios=0.5,1,2
    ("anchor_scales", [2, 4], "anchor_scales", (2.0, 4.0)),
    ("anchor_scales", 4, "anchor_scales", (4.0,)),
    ("label_names", "cat,dog", "label_names", ("cat", "dog")),
    ("label_names", "('cat', 'dog')", "label_names", ("cat", "dog")),
    ("label_names", "cat", "label_names", ("cat",)),
    ("label_names", "", "label_names", ()),
    ("seed", "None", "seed", None),
    ("seed", "7", "seed", 7),
    ("load_path", None, "load_path", None),
    ("env", 123, "env", "123"),                          # fire turns --env=123 into an int
    ("device", "cuda:1", "device", "cuda:1"),
])
def test_values_are_converted_to_the_option_type(key, value, name, expected):
    got = getattr(Config.parse({key: value}), name)
    assert got == expected and type(got) is type(expected)
    if isinstance(expected, tuple):
        assert all(type(g) is type(e) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"data": "cocoa"}, r"--data must be one of \['voc', 'coco', 'toy', 'toy-coco'\], got 'cocoa'"),
    ({"backbone": "resnet"}, "--backbone must be one of"),
    ({"min_size": 2000}, r"--min-size \(2000\) must not exceed --max-size \(1000\)"),
    ({"port": 0}, "--port"),
    ({"lr": 0}, "--lr must be > 0"),
    ({"num_workers": -1}, "--num-workers must be >= 0"),
    ({"ratios": ()}, "--ratios"),
    ({"device": "gpu"}, "--device must be"),
])
def test_values_out_of_range_are_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config.parse(kwargs)


def test_paths_expand_the_home_folder():
    c = Config.parse({"load_path": "~/runs/best.pth", "voc_data_dir": "~/VOC2007"})
    home = os.path.expanduser("~")
    assert c.load_path == os.path.join(home, "runs", "best.pth")
    assert c.voc_data_dir == os.path.join(home, "VOC2007")


def test_no_preset_without_toy():
    assert Config.parse({}) == Config()
    assert Config.parse({"epoch": 3}) == dataclasses.replace(Config(), epoch=3)


def test_toy_preset_applies_to_every_option_not_given():
    c = Config.parse({"data": "toy"})
    for key, value in TOY_PRESET.items():
        assert getattr(c, key) == value, key
    expected = dataclasses.replace(Config(), data="toy", **TOY_PRESET)
    assert c == expected


def test_toy_preset_leaves_explicit_options_alone():
    c = Config.parse({"data": "toy", "min-size": 200, "epoch": "3", "use_visdom": True})
    assert (c.min_size, c.epoch, c.use_visdom) == (200, 3, True)
    assert c.max_size == TOY_PRESET["max_size"] and c.backbone == "toy"
    assert "min_size" in TOY_PRESET and "epoch" in TOY_PRESET and "use_visdom" in TOY_PRESET


def test_toy_preset_follows_data_from_base_and_keeps_its_settings():
    c = Config.parse({"lr": 0.5}, base=dataclasses.replace(Config(), data="toy"))
    assert c.lr == 0.5 and c.min_size == TOY_PRESET["min_size"]
    trained = Config.parse({"data": "toy", "epoch": 30, "test_num": 50})  # e.g. a checkpoint's config
    c = Config.parse({"test_num": 20}, base=trained)
    assert (c.epoch, c.test_num, c.min_size) == (30, 20, TOY_PRESET["min_size"])


def test_toy_preset_keys_are_options_of_the_right_type():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(TOY_PRESET) <= names and "data" not in TOY_PRESET
    c = Config(**{**dataclasses.asdict(Config()), **TOY_PRESET})  # converted and checked on construction
    assert all(getattr(c, key) == value and type(getattr(c, key)) is type(value)
               for key, value in TOY_PRESET.items())


def test_parse_in_place_updates_the_shared_instance_and_prints(capsys):
    c = Config()
    same = c
    c._parse({"plot-every": 100, "env": "fasterrcnn-caffe", "caffe_pretrain": True})
    assert same is c and (c.plot_every, c.env, c.caffe_pretrain) == (100, "fasterrcnn-caffe", True)
    out = capsys.readouterr().out
    assert "======user config========" in out and "plot_every" in out and "fasterrcnn-caffe" in out
    with pytest.raises(ConfigError):
        c._parse({"epoch": "abc"})
    assert c.epoch == 14  # a failed parse changes nothing


def test_to_dict_is_plain_and_round_trips():
    c = Config.parse({"data": "toy", "label_names": "a,b", "seed": 3, "load_path": "x.pth"})
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d  # only JSON-able plain values: lists, not tuples
    assert d["anchor_scales"] == [float(s) for s in TOY_PRESET["anchor_scales"]]
    assert d["label_names"] == ["a", "b"]
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert Config.from_dict(d) == c


def test_from_dict_reads_an_original_checkpoint_config():
    original = {  # every key of the original's Config._state_dict(), non-default values in a few
        "voc_data_dir": "/home/cy/.chainer/dataset/pfnet/chainercv/voc/VOCdevkit/VOC2007/", "min_size": 600,
        "max_size": 1000, "num_workers": 8, "test_num_workers": 8, "rpn_sigma": 3.0, "roi_sigma": 1.0,
        "weight_decay": 0.0005, "lr_decay": 0.1, "lr": 0.001, "env": "fasterrcnn-caffe", "port": 8097,
        "plot_every": 100, "data": "voc", "pretrained_model": "vgg16", "epoch": 14, "use_adam": False,
        "use_chainer": False, "use_drop": False, "debug_file": "/tmp/debugf", "test_num": 10000,
        "load_path": None, "caffe_pretrain": True, "caffe_pretrain_path": "checkpoints/vgg16_caffe.pth",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the original's dead options are expected: no warning
        c = Config.from_dict(original)
    assert c.caffe_pretrain is True and c.env == "fasterrcnn-caffe" and c.plot_every == 100
    assert c.voc_data_dir == original["voc_data_dir"]
    assert c.lr_decay_epoch == 9 and c.device == "auto"  # new options: defaults


def test_from_dict_warns_about_unknown_keys_and_bad_values_and_stays_usable():
    with pytest.warns(UserWarning) as record:
        c = Config.from_dict({"lr": "fast", "from_the_future": 1, "epoch": 5})
    messages = [str(w.message) for w in record]
    assert any("from_the_future" in m for m in messages)
    assert any("--lr expects float" in m and "0.001" in m for m in messages)
    assert (c.lr, c.epoch) == (1e-3, 5)


def test_from_dict_fills_a_partial_toy_config_from_the_preset():
    c = Config.from_dict({"data": "toy", "epoch": 2})
    assert c.epoch == 2 and c.min_size == TOY_PRESET["min_size"] and c.backbone == "toy"
    assert Config.from_dict({}) == Config()


def test_help_text_lists_every_option_with_its_default_and_doc():
    text = Config.help_text()
    lines = text.splitlines()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        (line,) = [ln for ln in lines if ln.split()[:1] == [flag]]
        assert f.metadata["doc"] and f.metadata["doc"] in line
    line = {ln.split()[0]: ln for ln in lines if ln.strip().startswith("--")}
    assert f"(default: 0.001; toy: {TOY_PRESET['lr']})" in line["--lr"]
    assert f"(default: 14; toy: {TOY_PRESET['epoch']})" in line["--epoch"]
    assert "(default: 0.5,1.0,2.0)" in line["--ratios"]
    assert "(default: None)" in line["--load-path"] and "str|None" in line["--load-path"]
    assert "(default: False)" in line["--use-adam"] and "bool" in line["--use-adam"]
    if not os.environ.get("XDG_CACHE_HOME"):
        assert "(default: ~/.cache/simple-faster-rcnn/toy_voc)" in line["--toy-data-dir"]


def test_markdown_table_has_a_row_per_option():
    rows = Config.markdown_table().splitlines()[2:]
    assert [r.split("|")[1].strip().strip("`") for r in rows] == FLAGS


@pytest.mark.skipif(bool(os.environ.get("XDG_CACHE_HOME")), reason="the table shows the default cache folder")
def test_readme_option_table_is_the_config_table():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(path, encoding="utf-8") as f:
        readme = f.read()
    assert Config.markdown_table() in readme, "README.md's table is stale: paste Config.markdown_table()"


def test_torch_device():
    torch = pytest.importorskip("torch")
    assert Config.parse({"device": "cpu"}).torch_device() == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Config().torch_device().type == expected
