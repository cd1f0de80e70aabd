"""vis_tool: boxes drawn where they belong (checked on rendered pixels), and the Visualizer with a real visdom
server, with none, and with one that dies mid-run; its history files in every case."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.vis_tool import VisdomUnavailableWarning, Visualizer, fig4vis, vis_bbox, vis_image, visdom_bbox

GRAY = 200


def gray_image(h=100, w=200):
    return np.full((3, h, w), GRAY, dtype=np.float32)


def canvas_axes(h=100, w=200):
    """An off-screen figure of ``w x h`` pixels whose axes fill it (one figure pixel per image pixel)."""
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    return fig, ax


def pixel(rendered, ax, x, y):
    """RGB of the rendered figure at image coordinates ``(x, y)`` (located through the axes' transform)."""
    x_disp, y_disp = ax.transData.transform((x, y))
    row = rendered.shape[1] - 1 - int(y_disp)  # display y goes up, rows go down
    return rendered[:, row, int(x_disp)]


def is_red(rgb):
    return rgb[0] > 0.8 and rgb[1] < 0.25 and rgb[2] < 0.25


def is_gray(rgb):
    return np.allclose(rgb, GRAY / 255, atol=0.02)


# --- drawing ------------------------------------------------------------------------------------------------
def test_fig4vis_gives_rgb_chw_in_0_1():
    fig, ax = canvas_axes(60, 80)
    img = np.zeros((3, 60, 80), np.float32)
    img[0, :, :40] = 255  # left half red
    img[2, :, 40:] = 255  # right half blue
    vis_image(img, ax=ax)
    out = fig4vis(fig)
    assert out.shape == (3, 60, 80) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[:, 30, 10], [1, 0, 0], atol=0.02)
    np.testing.assert_allclose(out[:, 30, 70], [0, 0, 1], atol=0.02)


def test_fig4vis_closes_a_pyplot_figure_and_renders_a_bare_figure():
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1), dpi=50)
    assert plt.fignum_exists(fig.number)
    assert fig4vis(fig).shape == (3, 50, 100)
    assert not plt.fignum_exists(fig.number)
    assert fig4vis(Figure(figsize=(1, 1), dpi=30)).shape == (3, 30, 30)  # no canvas attached: Agg is used


def test_vis_bbox_draws_red_outlines_on_the_box_edges_only():
    bbox = np.array([[20, 40, 80, 160]], np.float32)  # (y_min, x_min, y_max, x_max)
    fig, ax = canvas_axes()
    vis_bbox(gray_image(), bbox, ax=ax)
    drawn = fig4vis(fig)
    fig, ax_plain = canvas_axes()
    vis_bbox(gray_image(), np.zeros((0, 4), np.float32), ax=ax_plain)
    plain = fig4vis(fig)
    edges = [(100, 20), (100, 80), (40, 50), (160, 50), (40, 20), (160, 80)]  # (x, y): top, bottom, sides
    for x, y in edges:
        assert is_red(pixel(drawn, ax, x, y)), (x, y)
        assert is_gray(pixel(plain, ax_plain, x, y)), (x, y)
    for x, y in [(100, 50), (10, 10), (190, 90), (100, 10), (100, 90), (30, 50)]:  # inside, outside
        assert is_gray(pixel(drawn, ax, x, y)), (x, y)
    red = (drawn[0] > 0.8) & (drawn[1] < 0.25) & (drawn[2] < 0.25)
    rows, cols = np.nonzero(red)
    assert 17 <= rows.min() <= 20 and 80 <= rows.max() <= 83  # a 2-point line is ~3 px wide at 100 dpi
    assert 37 <= cols.min() <= 40 and 160 <= cols.max() <= 163


def test_vis_bbox_captions():
    bbox = np.array([[10, 10, 50, 50], [20, 30, 60, 90], [0, 0, 5, 5]], np.float32)
    names = ("cat", "dog")
    _, ax = canvas_axes()
    vis_bbox(gray_image(), bbox, label=[1, 0, 7], score=[0.876, 0.5, 0.1], ax=ax, label_names=names)
    assert [t.get_text() for t in ax.texts] == ["dog: 0.88", "cat: 0.50", "7: 0.10"]  # 7: no such name
    assert [t.get_position() for t in ax.texts] == [(10, 10), (30, 20), (0, 0)]  # (x_min, y_min)
    assert all(t.get_style() == "italic" for t in ax.texts)
    _, ax = canvas_axes()
    vis_bbox(gray_image(), bbox[:1], label=np.array([0]), ax=ax, label_names=names)
    assert [t.get_text() for t in ax.texts] == ["cat"]
    _, ax = canvas_axes()
    vis_bbox(gray_image(), bbox[:1], score=torch.tensor([0.25]), ax=ax)
    assert [t.get_text() for t in ax.texts] == ["0.25"]
    _, ax = canvas_axes()
    vis_bbox(gray_image(), bbox[:1], label=[11], ax=ax)  # default names: VOC's
    assert [t.get_text() for t in ax.texts] == ["dog"]
    _, ax = canvas_axes()
    vis_bbox(gray_image(), bbox, ax=ax)
    assert len(ax.texts) == 0 and len(ax.patches) == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"label": [0, 1]}, "label has 2 entries for 3 boxes"),
    ({"score": [0.5]}, "score has 1 entries for 3 boxes"),
    ({"bbox": np.zeros((3, 5))}, r"bbox must have shape \(R, 4\)"),
    ({"img": np.zeros((100, 200, 3))}, r"\(3, H, W\)"),
])
def test_vis_bbox_bad_input(kwargs, match):
    args = {"img": gray_image(), "bbox": np.zeros((3, 4), np.float32)} | kwargs
    _, ax = canvas_axes()
    with pytest.raises(ValueError, match=match):
        vis_bbox(args.pop("img"), args.pop("bbox"), ax=ax, **args)


def test_vis_bbox_takes_tensors():
    _, ax = canvas_axes()
    vis_bbox(torch.full((3, 100, 200), float(GRAY)), torch.tensor([[20.0, 40, 80, 160]]), torch.tensor([0]),
             torch.tensor([0.9]), ax=ax, label_names=("a",))
    assert [t.get_text() for t in ax.texts] == ["a: 0.90"]


def test_visdom_bbox_renders_off_screen():
    import matplotlib.pyplot as plt

    n_open = len(plt.get_fignums())
    out = visdom_bbox(gray_image(), np.array([[20, 40, 80, 160]], np.float32), label_names=("a",))
    w, h = (matplotlib.rcParams["figure.figsize"][i] * matplotlib.rcParams["figure.dpi"] for i in (0, 1))
    assert out.shape == (3, round(h), round(w)) and out.dtype == np.float32
    red = (out[0] > 0.8) & (out[1] < 0.25) & (out[2] < 0.25)
    assert red.sum() > 100
    empty = visdom_bbox(gray_image(), np.zeros((0, 4), np.float32))
    assert not ((empty[0] > 0.8) & (empty[1] < 0.25) & (empty[2] < 0.25)).any()
    assert len(plt.get_fignums()) == n_open  # no pyplot figure left behind


def test_vis_image_without_axes_opens_a_pyplot_figure():
    import matplotlib.pyplot as plt

    ax = vis_image(gray_image())
    try:
        assert plt.fignum_exists(ax.figure.number) and len(ax.images) == 1
    finally:
        plt.close(ax.figure)


def test_import_leaves_the_matplotlib_backend_alone():
    """The original forced Agg at import; a notebook's inline backend (here: svg) must survive the import."""
    code = ("import sys, matplotlib; matplotlib.use('svg'); import utils.vis_tool; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# --- Visualizer without a server ----------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_history(log_dir):
    with open(os.path.join(log_dir, "history.jsonl")) as f:
        return [json.loads(line) for line in f]


def png_size(path):
    img = matplotlib.image.imread(path)
    return img.shape[1], img.shape[0]


def test_no_server_one_warning_then_quiet_no_ops_and_files_written(tmp_path):
    port = free_port()
    with pytest.warns(VisdomUnavailableWarning) as record:
        vis = Visualizer(env="t", port=port, server="http://127.0.0.1", log_dir=tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"127.0.0.1:{port}" in message and "visdom.server" in message and "curves.png" in message
    assert not vis.connected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vis.plot("loss", 1.0)
        vis.plot("loss", np.float32(0.5))
        vis.plot_many({"map": torch.tensor(0.25), "skipped": None}, step=40)
        vis.img("gt_img", gray_image() / 255)
        vis.text(["cat", "dog"], win="labels")
        vis.log("lr: 0.001")
        vis.save()
    records = read_history(tmp_path)
    assert [(r["name"], r["step"], r["value"]) for r in records] == [
        ("loss", 0, 1.0), ("loss", 1, 0.5), ("map", 40, 0.25)]
    assert all(abs(r["time"] - time.time()) < 60 for r in records)
    assert png_size(tmp_path / "curves.png") == (2 * 4 * 80, 3 * 80)  # two panels side by side
    assert "lr: 0.001" in vis.log_text
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "history.jsonl"]  # no temp files left


def test_use_visdom_false_is_silent_and_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vis = Visualizer(use_visdom=False)
        vis.plot("loss", 1.0)
        vis.flush()
    assert not vis.connected and vis.history[0]["value"] == 1.0
    assert os.listdir(tmp_path) == []


def test_files_are_throttled_until_flush(tmp_path):
    vis = Visualizer(use_visdom=False, log_dir=tmp_path / "run", flush_every=3600)
    vis.plot("loss", 3.0)  # the first point is written at once
    vis.plot("loss", 2.0)
    assert len(read_history(tmp_path / "run")) == 1
    vis.flush()
    assert [r["value"] for r in read_history(tmp_path / "run")] == [3.0, 2.0]


def test_history_is_read_back_and_continued(tmp_path):
    vis = Visualizer(use_visdom=False, log_dir=tmp_path)
    vis.plot("loss", 3.0)
    vis.plot("loss", 2.0)
    vis.plot("map", 0.1, step=100)
    vis.flush()
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"name": "loss", "ste')  # a torn line, as an old version killed mid-write could leave
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        resumed = Visualizer(use_visdom=False, log_dir=tmp_path)
    resumed.plot("loss", 1.0)
    resumed.plot("map", 0.2)
    resumed.flush()
    got = [(r["name"], r["step"], r["value"]) for r in read_history(tmp_path)]
    assert got == [("loss", 0, 3.0), ("loss", 1, 2.0), ("map", 100, 0.1), ("loss", 2, 1.0), ("map", 101, 0.2)]


def test_state_dict_round_trip_and_the_originals_vis_info():
    vis = Visualizer(env="a", use_visdom=False)
    vis.plot("loss", 1.0)
    vis.plot("loss", 1.0)
    vis.log("hello")
    state = vis.state_dict()
    assert json.loads(json.dumps(state)) == state
    other = Visualizer(env="b", use_visdom=False).load_state_dict(state)
    assert (other.index, other.log_text, other.env) == ({"loss": 2}, vis.log_text, "a")
    original = {"index": {"total_loss": 7}, "vis_kw": {}, "log_text": "[0101_000000] x <br>", "env": "main"}
    other.load_state_dict(original)
    assert (other.index, other.log_text, other.env) == ({"total_loss": 7}, original["log_text"], "main")
    other.plot("total_loss", 0.5)
    assert other.history[-1]["step"] == 7


# --- Visualizer with a real visdom server -------------------------------------------------------------------
class VisdomServer:
    """A visdom server on 127.0.0.1 in a temp env_path (run_server.main: no download of the web assets)."""

    def __init__(self, env_path):
        self.port = free_port()
        self.env_path = str(env_path)
        self.log = open(os.path.join(self.env_path, "server.log"), "w")
        command = [sys.executable, "-c", "from visdom.server.run_server import main; main()",
                   "-port", str(self.port), "--hostname", "127.0.0.1", "-bind_local",
                   "-env_path", self.env_path, "-logging_level", "WARNING"]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    with open(os.path.join(self.env_path, "server.log")) as f:
                        pytest.fail(f"visdom server did not start:\n{f.read()}")
                time.sleep(0.1)

    def client(self, env):
        import visdom

        return visdom.Visdom(server="http://127.0.0.1", port=self.port, env=env, use_incoming_socket=False,
                             raise_exceptions=True)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def visdom_server(tmp_path):
    (tmp_path / "visdom").mkdir()
    server = VisdomServer(tmp_path / "visdom")
    try:
        yield server
    finally:
        server.stop()


def window(client, win, env):
    return json.loads(client.get_window_data(win=win, env=env))


@pytest.mark.slow
def test_real_server_holds_the_windows(visdom_server, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", VisdomUnavailableWarning)
        vis = Visualizer(env="test_env", port=visdom_server.port, server="127.0.0.1",
                         log_dir=tmp_path / "run")
        assert vis.connected
        vis.plot("loss", 1.0)
        vis.plot("loss", 0.5)
        vis.plot_many({"map": 0.3}, step=40)
        vis.plot("map", 0.6, step=80)
        vis.img("gt_img", visdom_bbox(gray_image(), np.array([[20, 40, 80, 160]], np.float32)))
        vis.text(("cat", "dog"), win="labels")
        vis.log("lr: 0.001")
        vis.log("map: 0.6")
        vis.save()
    assert vis.connected
    client = visdom_server.client("test_env")
    loss = window(client, "loss", "test_env")["content"]["data"][0]
    assert (loss["x"], loss["y"]) == ([0, 1], [1.0, 0.5])
    map_ = window(client, "map", "test_env")["content"]["data"][0]
    assert (map_["x"], map_["y"]) == ([40, 80], [0.3, 0.6])
    img = window(client, "gt_img", "test_env")
    assert img["type"] == "image" and img["content"]["src"].startswith("data:image/png;base64,")
    log = window(client, "log_text", "test_env")["content"]
    assert "lr: 0.001" in log and "map: 0.6" in log
    assert window(client, "labels", "test_env")["content"] == "('cat', 'dog')"
    assert os.path.exists(os.path.join(visdom_server.env_path, "test_env.json"))  # save() persisted the env
    assert [r["value"] for r in read_history(tmp_path / "run")] == [1.0, 0.5, 0.3, 0.6]


@pytest.mark.slow
def test_server_dying_mid_run_costs_one_warning(visdom_server, tmp_path):
    vis = Visualizer(env="dies", port=visdom_server.port, server="http://127.0.0.1", log_dir=tmp_path)
    vis.plot("loss", 1.0)
    assert vis.connected
    visdom_server.stop()
    with pytest.warns(VisdomUnavailableWarning, match="stopped answering") as record:
        vis.plot("loss", 0.5)
        vis.plot("loss", 0.25)
        vis.img("gt_img", gray_image() / 255)
        vis.log("still going")
        vis.save()
    assert len(record) == 1 and f"127.0.0.1:{visdom_server.port}" in str(record[0].message)
    assert not vis.connected
    assert [r["value"] for r in read_history(tmp_path)] == [1.0, 0.5, 0.25]


def test_a_port_that_never_answers_is_no_server(tmp_path):
    """Something listening that accepts connections and never answers (here a bare listening socket)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.warns(VisdomUnavailableWarning, match=f"no visdom server at http://127.0.0.1:{port}"):
            vis = Visualizer(port=port, server="127.0.0.1", log_dir=tmp_path)
    assert not vis.connected


def test_another_http_server_is_no_visdom_server(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to all
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.warns(VisdomUnavailableWarning, match="it answers, but not as a visdom server"):
            vis = Visualizer(port=server.server_address[1], server="127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
    assert not vis.connected


# --- array_tool (the conversions vis_tool and the trainer use) ----------------------------------------------
def test_tonumpy():
    from utils.array_tool import tonumpy

    a = np.arange(6.0).reshape(2, 3)
    assert tonumpy(a) is a
    t = torch.arange(6.0, requires_grad=True).reshape(2, 3) * 2
    np.testing.assert_array_equal(tonumpy(t), a * 2)
    with pytest.raises(TypeError, match="got list"):
        tonumpy([1, 2])


def test_totensor_shares_memory_and_follows_the_device_asked():
    from utils.array_tool import totensor

    a = np.zeros(3, np.float32)
    t = totensor(a)
    a[1] = 5
    assert t.device.type == "cpu" and t[1].item() == 5  # torch.from_numpy: same memory
    g = torch.ones(2, requires_grad=True)
    assert not totensor(g).requires_grad and totensor(g).data_ptr() == g.data_ptr()
    assert totensor(a, device="cpu").device.type == "cpu"
    if torch.cuda.is_available():
        assert totensor(a, device="cuda").device.type == "cuda"
    with pytest.raises(TypeError, match="got str"):
        totensor("x")


def test_scalar_gives_python_numbers():
    from utils.array_tool import scalar

    assert type(scalar(np.array([3.5], np.float32))) is float and scalar(np.array([[3.5]])) == 3.5
    assert type(scalar(np.float32(2))) is float and type(scalar(np.int64(2))) is int
    assert scalar(torch.tensor(7)) == 7 and type(scalar(torch.tensor(7))) is int
    assert scalar(torch.tensor([0.5], requires_grad=True)) == 0.5
    assert scalar(4) == 4
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        scalar(np.array([1, 2]))
    with pytest.raises(ValueError, match="one element"):
        scalar(torch.zeros(0))
    with pytest.raises(TypeError):
        scalar("1")

