"""Target adapters load from local folders only and obey the protocol."""

import pytest
import torch

from rsgm.components.diffusion_adapters import DiTTarget, PixelUNetTarget, RSGMCheckpointTarget, TextUNetTarget


def test_pixel_unet_round_trip(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=11,
                       norm_num_groups=4, add_attention=False)
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    target = PixelUNetTarget(path=str(tmp_path)).load()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 999])
    y = torch.tensor([1, 2, 3])
    assert torch.equal(target.encode(x), x) and target.num_timesteps == 1000
    assert target.null_cond(3).tolist() == [10, 10, 10]
    torch.testing.assert_close(target.eps(x, t, y), unet(x, t, class_labels=y).sample)
    assert not any(p.requires_grad for p in target.parameters())


def test_dit_pipeline_folder(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=4, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).save_pretrained(tmp_path / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(tmp_path / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    target = DiTTarget(str(tmp_path)).load()
    z = target.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert z.shape == (2, 4, 4, 4)
    eps = target.eps(z, torch.tensor([5, 500]), torch.tensor([1, 2]))
    assert eps.shape == z.shape  # the learned-sigma half is dropped
    assert target.null_cond(2).tolist() == [10, 10]


def test_missing_folders_name_what_to_put_where(tmp_path):
    DiTTarget(str(tmp_path / "DiT-XL-2-256"))  # construction never touches the disk
    with pytest.raises(FileNotFoundError, match="DiTPipeline"):
        DiTTarget(str(tmp_path / "DiT-XL-2-256")).load()
    (tmp_path / "dit").mkdir()
    with pytest.raises(FileNotFoundError, match="transformer"):
        DiTTarget(str(tmp_path / "dit")).load()
    with pytest.raises(FileNotFoundError, match="StableDiffusionPipeline"):
        TextUNetTarget(str(tmp_path / "sd")).load()
    with pytest.raises(FileNotFoundError, match="rsgm fit"):
        RSGMCheckpointTarget(str(tmp_path / "last.ckpt")).load()


def test_rsgm_checkpoint(tmp_path):
    from lightning.pytorch import Trainer

    from rsgm.datamodules.membership import DigitsDiffusionData
    from rsgm.lightning_modules.diffusion import ClassConditionalDiffusion

    model = ClassConditionalDiffusion(block_out_channels=(8, 16), export_dir=str(tmp_path / "export"))
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDiffusionData(n_members=16, batch_size=16))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    target = RSGMCheckpointTarget(str(tmp_path / "last.ckpt")).load()
    exported = PixelUNetTarget(path=str(tmp_path / "export")).load()
    assert (tmp_path / "export" / "membership.json").is_file()
    x, t, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 300]), torch.tensor([0, 9])
    torch.testing.assert_close(target.eps(x, t, y), exported.eps(x, t, y))
    torch.testing.assert_close(target.alphas_cumprod, exported.alphas_cumprod)
