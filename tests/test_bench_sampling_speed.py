"""bench/sampling_speed.py's bare DDIM loop is the reference its rows are checked against: for every prediction
type it converts, it must give the pipeline's DDIM images from the same noise."""


import pytest
import torch
from diffusers import UNet2DModel

from pipelines import DiffusionImagePipeline
from schedulers import DDIMScheduler
from tests.bench_helpers import load_bench_script


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "score"])
def test_the_bare_loop_matches_the_pipelines_ddim(prediction_type):
    bench = load_bench_script("sampling_speed")
    torch.manual_seed(0)
    network = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          layers_per_block=1, norm_num_groups=4, num_class_embeds=3).eval()
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True)
    rows = bench.runners(DiffusionImagePipeline(network, scheduler), network, batch_size=2, steps=5)
    bare, ours = rows[bench.BARE](), rows["ours, DDIM"]()
    assert torch.allclose(bare, ours, atol=1e-4), (bare - ours).abs().max()
    assert bare.std() > 0.01  # not a constant image


def test_the_bare_loop_names_a_prediction_type_it_cannot_convert():
    bench = load_bench_script("sampling_speed")
    with pytest.raises(ValueError, match="'edm'"):
        bench.bare_loop(None, bench.DiffusersDDIM(prediction_type="edm"), batch_size=1, steps=2)
