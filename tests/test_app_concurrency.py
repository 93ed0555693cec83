"""Twenty simultaneous Generate requests through gradio_client against a served app: all answered, each with
its own images (issue 9, item 6). The server is the real one (queue, concurrency limit, file serving)."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
from gradio_client import Client

import app
from tests.app_helpers import GENERATE, make_catalog, make_model_root
from webui import generate
from webui.sampling import parse_job, run_job

REQUESTS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, single_thread):
    models = make_model_root(tmp_path_factory.mktemp("models"))
    ui = app.make_app([models])
    port = free_port()
    app.launch(ui, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", models
    ui.close()


def settings(i: int) -> dict:
    """Request i: its own seed and digit, so a swapped answer shows."""
    return {**GENERATE, "steps": 3, "batch": 1, "seed": 1000 + i, "class_name": str(i % 10)}


def test_twenty_simultaneous_requests_get_their_own_answers(server):
    url, models = server
    client = Client(url, verbose=False)
    jobs = [client.submit(*(settings(i)[k] for k in generate.INPUTS), api_name="/generate") for i in range(REQUESTS)]
    with ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert len(answers) == REQUESTS
    catalog = make_catalog(models)
    for i, (gallery, _, info, files, seed) in enumerate(answers):
        assert seed == 1000 + i and f"seed {1000 + i}" in info and "NFE 6 per image" in info
        served = PIL.Image.open(gallery[0]["image"])
        metadata = json.loads(served.text["parameters"])
        assert metadata["seed"] == 1000 + i and metadata["class_name"] == str(i % 10)
        values = settings(i)
        job = parse_job(catalog, **{k: values[k] for k in generate.INPUTS if k not in ("random_seed", "preview_every")})
        expected = run_job(catalog, job).images[0]
        assert np.array_equal(np.asarray(served), np.asarray(expected))
        assert len(files) == 2  # the grid and the one image


def test_a_failing_request_does_not_take_the_server_down(server):
    url, _ = server
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="steps must be|less than minimum"):
        client.predict(*({**settings(0), "steps": 0}[k] for k in generate.INPUTS), api_name="/generate")
    with pytest.raises(Exception, match="refusing"):
        client.predict(*({**settings(0), "model": "pickled"}[k] for k in generate.INPUTS), api_name="/generate")
    gallery, _, info, _, _ = client.predict(*(settings(1)[k] for k in generate.INPUTS), api_name="/generate")
    assert "seed 1001" in info and len(gallery) == 1
