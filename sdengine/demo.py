"""The offline demo: random tiny checkpoint -> ONNX -> image, then image to image and inpainting from it, an
edited prompt drawn again at twice the size (the hires fix), the same prompt with a random LoRA fused, and
with a random ControlNet following the image's edges, a tiny random SDXL model's image, alone and with a
tiny random refiner finishing its run, and the first image as the image prompt of a random IP-Adapter, with
the PyTorch baseline beside each.

Needs the ``export`` extra (torch, diffusers) for writing the checkpoint, exporting it and the baseline.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from sdengine.images import psnr, save_png
from sdengine.refiner import DEFAULT_REFINER_SWITCH

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry"
SEED = 0
IMG2IMG_PROMPT = "the same scene as a watercolour"
IMG2IMG_STRENGTH = 0.6
INPAINT_PROMPT = "a full moon in the sky"
#: The AUTOMATIC1111 web UI's prompt editing: a horse for the first half of the steps, a camel after.
EDITED_PROMPT = "a photo of an astronaut riding a [horse:camel:0.5] on mars"
HIRES_SCALE = 2.0
LORA_SCALE = 0.8
CONTROL_PROMPT = "a castle on a hill"
CONTROL_SCALE = 0.8
XL_PROMPT = "a lighthouse on a cliff at sunset"
IP_PROMPT = "a house in the style of the image"
PAG_SCALE = 3.0
#: the middle block sees one token at 64x64 in the tiny model (attention there is the identity anyway)
PAG_LAYERS = ("mid", "down_blocks.1")
#: the latent consistency model's run: LCM_Dreamshaper_v7's defaults (its scheduler, 4 steps, scale 8.5)
#: and its UNet's guidance embedding width
LCM_SETTINGS = dict(scheduler="lcm", steps=4, guidance=8.5)
#: DeepCache's interval (the whole UNet on every third call), at the authors' branch 0
DEEPCACHE_INTERVAL = 3
#: FreeU's scales (s1, s2, b1, b2): diffusers' example for SD 1.5
FREEU_SCALES = (0.9, 0.2, 1.5, 1.6)
#: adaptive projected guidance's (eta, norm threshold, momentum), near the paper's, at a high guidance scale
APG_SETTINGS, APG_GUIDANCE = (0.0, 15.0, -0.5), 12.0
LCM_WIDTH = 256


def centre_mask(height: int, width: int) -> np.ndarray:
    """A (1, H, W) inpainting mask: repaint the centre half of each side, keep the rest."""
    mask = np.zeros((1, height, width), np.float32)
    mask[:, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    return mask


def edge_map(image: np.ndarray) -> np.ndarray:
    """A (H, W, 3) control image of an (H, W, 3) image's edges: white where its brightness changes most (the
    top tenth of gradient magnitudes), black elsewhere, as an edge detector's map is given to a ControlNet."""
    gy, gx = np.gradient(image.mean(axis=-1))
    magnitude = np.hypot(gx, gy)
    edges = (magnitude > np.quantile(magnitude, 0.9)).astype(np.float32)
    return np.repeat(edges[..., None], 3, axis=-1)


def run_demo(
    workdir: Path, *, output: Path, steps: int = 20, scheduler: str | None = None
) -> dict[str, float]:
    from export.checkpoint import write_random_checkpoint
    from export.controlnet import write_random_controlnet
    from export.ip_adapter import write_random_ip_adapter
    from export.onnx_export import export_checkpoint
    from export.random_lora import write_random_lora
    from export.tiny_vae import write_random_tiny_vae
    from sdengine.cli import format_times
    from sdengine.pipeline import Pipeline

    say = lambda text: print(text, file=sys.stderr)  # noqa: E731 - progress lines on stderr, results on stdout
    checkpoint, onnx_dir = workdir / "tiny-checkpoint", workdir / "tiny-onnx"
    say(f"[1/20] writing a tiny random-weight SD 1.x checkpoint to {checkpoint}")
    write_random_checkpoint(checkpoint, "tiny", seed=SEED, overwrite=True)
    say(f"[2/20] exporting it to ONNX in {onnx_dir}")
    export_checkpoint(checkpoint, onnx_dir)
    pipes, results = {}, {}
    for i, (backend, path) in enumerate((("ort", onnx_dir), ("torch", checkpoint)), start=3):
        say(f"[{i}/20] text to image with the {backend} backend")
        pipes[backend] = Pipeline.load(path, backend=backend)
        pipes[backend](PROMPT, NEGATIVE, steps=1, seed=SEED, scheduler=scheduler)  # warm-up, not timed
        results[backend] = pipes[backend](PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler)
    ort_result = results["ort"]
    on_both = lambda prompt, **settings: {  # noqa: E731 - the same request on each backend
        backend: pipe(prompt, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler, **settings)
        for backend, pipe in pipes.items()
    }
    say(f"[5/20] image to image from the ort image (strength {IMG2IMG_STRENGTH}) with both backends")
    redone = on_both(IMG2IMG_PROMPT, image=ort_result.array, strength=IMG2IMG_STRENGTH)
    say("[6/20] inpainting the centre of the ort image with both backends")
    mask = centre_mask(ort_result.request.height, ort_result.request.width)
    inpainted = on_both(INPAINT_PROMPT, image=ort_result.array, mask=mask)
    say(
        f"[7/20] an edited prompt ({EDITED_PROMPT!r}), then the hires fix at {HIRES_SCALE:g}x, "
        "on both backends"
    )
    edited = on_both(EDITED_PROMPT, prompt_weights="a1111", hires_scale=HIRES_SCALE)
    lora = write_random_lora(onnx_dir, workdir / "random-lora.safetensors", seed=SEED)
    say(
        f"[8/20] text to image with a random LoRA ({lora.name}) fused at scale {LORA_SCALE}, on both backends"
    )
    for pipe in pipes.values():
        pipe.load_lora(lora, LORA_SCALE)
    with_lora = on_both(PROMPT)
    controlnet, control_onnx = workdir / "random-controlnet", workdir / "tiny-onnx-controlnet"
    say(f"[9/20] a random ControlNet ({controlnet.name}) given the first image's edges, on both backends")
    shutil.rmtree(controlnet, ignore_errors=True)
    write_random_controlnet(checkpoint, controlnet, seed=SEED)
    components = ["text_encoder", "unet", "vae_decoder"]
    export_checkpoint(checkpoint, control_onnx, controlnets=[controlnet], components=components)
    control = {"control_image": edge_map(ort_result.array[0]), "control_scale": CONTROL_SCALE}
    controlled = {
        backend: Pipeline.load(path, backend=backend, **extra)(
            CONTROL_PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler, **control
        )
        for backend, path, extra in (
            ("ort", control_onnx, {}),
            ("torch", checkpoint, {"controlnets": [controlnet]}),
        )
    }
    xl_checkpoint, xl_onnx = workdir / "tiny-xl-checkpoint", workdir / "tiny-xl-onnx"
    say(f"[10/20] a tiny random-weight SDXL checkpoint, exported to {xl_onnx}, on both backends")
    write_random_checkpoint(xl_checkpoint, "tiny-xl", seed=SEED, overwrite=True)
    export_checkpoint(
        xl_checkpoint, xl_onnx, components=["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    )
    xl = {
        backend: Pipeline.load(path, backend=backend)(XL_PROMPT, steps=steps, seed=SEED, scheduler=scheduler)
        for backend, path in (("ort", xl_onnx), ("torch", xl_checkpoint))
    }
    refiner_checkpoint, refiner_onnx = (
        workdir / "tiny-xl-refiner-checkpoint",
        workdir / "tiny-xl-refiner-onnx",
    )
    say(
        f"[11/20] the SDXL model again, with a tiny random-weight refiner ({refiner_onnx}) making the last "
        f"{1 - DEFAULT_REFINER_SWITCH:.0%} of the run, on both backends"
    )
    write_random_checkpoint(refiner_checkpoint, "tiny-xl-refiner", seed=SEED, overwrite=True)
    export_checkpoint(refiner_checkpoint, refiner_onnx, components=["text_encoder_2", "unet", "vae_decoder"])
    refined = {
        backend: Pipeline.load(path, backend=backend, refiner=refiner)(
            XL_PROMPT, steps=steps, seed=SEED, scheduler=scheduler
        )
        for backend, path, refiner in (
            ("ort", xl_onnx, refiner_onnx),
            ("torch", xl_checkpoint, refiner_checkpoint),
        )
    }
    adapter_dir, ip_onnx = workdir / "random-ip-adapter", workdir / "tiny-onnx-ip-adapter"
    say(
        f"[12/20] a random IP-Adapter ({adapter_dir.name}) given the first image as a prompt, on both "
        "backends"
    )
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter = write_random_ip_adapter(checkpoint, adapter_dir, seed=SEED)
    export_checkpoint(checkpoint, ip_onnx, ip_adapter=adapter, components=[*components, "image_encoder"])
    prompted = {
        backend: Pipeline.load(path, backend=backend, **extra)(
            IP_PROMPT,
            NEGATIVE,
            steps=steps,
            seed=SEED,
            scheduler=scheduler,
            ip_adapter_image=ort_result.array,
        )
        for backend, path, extra in (("ort", ip_onnx, {}), ("torch", checkpoint, {"ip_adapter": adapter}))
    }
    say(
        "[13/20] the first prompt again, its noise drawn as PyTorch's CPU generator draws it: diffusers "
        "draws its own, sdengine the same without PyTorch"
    )
    torch_noise = on_both(PROMPT, noise_source="torch-cpu")
    pag_onnx = workdir / "tiny-onnx-pag"
    say(
        f"[14/20] the first prompt with perturbed-attention guidance (scale {PAG_SCALE:g}, layers "
        f"{', '.join(PAG_LAYERS)}) on both backends"
    )
    export_checkpoint(checkpoint, pag_onnx, components=components, pag_layers=list(PAG_LAYERS))
    perturbed = {
        backend: Pipeline.load(path, backend=backend, **extra)(
            PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler, pag_scale=PAG_SCALE
        )
        for backend, path, extra in (("ort", pag_onnx, {}), ("torch", checkpoint, {"pag_layers": PAG_LAYERS}))
    }
    lcm_checkpoint, lcm_onnx = workdir / "tiny-lcm-checkpoint", workdir / "tiny-lcm-onnx"
    say(
        "[15/20] a tiny random latent consistency model (its UNet takes the guidance scale as an input: one "
        f"UNet call a step), {LCM_SETTINGS['steps']} steps of its scheduler, on both backends"
    )
    write_random_checkpoint(lcm_checkpoint, "tiny", seed=SEED, overwrite=True, guidance_embedding=LCM_WIDTH)
    export_checkpoint(lcm_checkpoint, lcm_onnx, components=components)
    consistent = {
        backend: Pipeline.load(path, backend=backend)(PROMPT, seed=SEED, **LCM_SETTINGS)
        for backend, path in (("ort", lcm_onnx), ("torch", lcm_checkpoint))
    }
    tiny_vae, tiny_vae_onnx = workdir / "tiny-vae-taesd", workdir / "tiny-taesd-onnx"
    say(
        "[16/20] the first checkpoint with a random tiny VAE (TAESD's architecture, many times faster) in "
        "its VAE's place, on both backends"
    )
    shutil.rmtree(tiny_vae, ignore_errors=True)
    write_random_tiny_vae(tiny_vae, seed=SEED)
    export_checkpoint(checkpoint, tiny_vae_onnx, components=components, vae=tiny_vae)
    tiny_decoded = {
        backend: Pipeline.load(path, backend=backend, **extra)(
            PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler
        )
        for backend, path, extra in (("ort", tiny_vae_onnx, {}), ("torch", checkpoint, {"vae": tiny_vae}))
    }
    deepcache_onnx = workdir / "tiny-onnx-deepcache"
    say(
        f"[17/20] the first prompt with DeepCache (the whole UNet on every call of {DEEPCACHE_INTERVAL}, its "
        "shallow branch on the cached feature between), against the authors' helper on diffusers"
    )
    export_checkpoint(checkpoint, deepcache_onnx, components=components, deepcache=0)
    cached = {
        backend: Pipeline.load(path, backend=backend, **extra)(
            PROMPT,
            NEGATIVE,
            steps=steps,
            seed=SEED,
            scheduler=scheduler,
            deepcache_interval=DEEPCACHE_INTERVAL,
        )
        for backend, path, extra in (("ort", deepcache_onnx, {}), ("torch", checkpoint, {"deepcache": 0}))
    }
    freeu_onnx = workdir / "tiny-onnx-freeu"
    say(
        f"[18/20] the first prompt with FreeU at {', '.join(map(str, FREEU_SCALES))} (its scales an input of "
        "the exported UNet), against diffusers' enable_freeu"
    )
    export_checkpoint(checkpoint, freeu_onnx, components=components, freeu=True)
    freed = {
        backend: Pipeline.load(path, backend=backend)(
            PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler, freeu=FREEU_SCALES
        )
        for backend, path in (("ort", freeu_onnx), ("torch", checkpoint))
    }
    say(
        "[19/20] the first prompt (the LoRA still fused) in Align Your Steps' 10 steps: DPM++ 2M at NVIDIA's "
        "timesteps for SD 1.5, on both backends"
    )
    aligned = {
        backend: pipe(PROMPT, NEGATIVE, seed=SEED, scheduler="dpmpp_2m", timesteps="ays")
        for backend, pipe in pipes.items()
    }
    say(
        f"[20/20] the first prompt (the LoRA still fused) at guidance {APG_GUIDANCE:g} with adaptive "
        f"projected guidance ({', '.join(map(str, APG_SETTINGS))}), on both backends"
    )
    projected = on_both(PROMPT, guidance=APG_GUIDANCE, apg=APG_SETTINGS)
    save_png(ort_result.images[0], output, {**ort_result.request.parameters(), "backend": "ort"})
    extra_outputs = {}
    for name, result in (
        ("img2img", redone["ort"]),
        ("inpaint", inpainted["ort"]),
        ("edit-hires", edited["ort"]),
        ("lora", with_lora["ort"]),
        ("controlnet", controlled["ort"]),
        ("sdxl", xl["ort"]),
        ("sdxl-refined", refined["ort"]),
        ("ip-adapter", prompted["ort"]),
        ("torch-noise", torch_noise["ort"]),
        ("pag", perturbed["ort"]),
        ("lcm", consistent["ort"]),
        ("taesd", tiny_decoded["ort"]),
        ("deepcache", cached["ort"]),
        ("freeu", freed["ort"]),
        ("ays", aligned["ort"]),
        ("apg", projected["ort"]),
    ):
        extra_outputs[name] = output.with_name(f"{output.stem}-{name}{output.suffix or '.png'}")
        save_png(result.images[0], extra_outputs[name], {**result.request.parameters(), "backend": "ort"})
    similarity = psnr(ort_result.array, results["torch"].array)
    img2img_similarity = psnr(redone["ort"].array, redone["torch"].array)
    inpaint_similarity = psnr(inpainted["ort"].array, inpainted["torch"].array)
    edit_similarity = psnr(edited["ort"].array, edited["torch"].array)
    lora_similarity = psnr(with_lora["ort"].array, with_lora["torch"].array)
    control_similarity = psnr(controlled["ort"].array, controlled["torch"].array)
    xl_similarity = psnr(xl["ort"].array, xl["torch"].array)
    refined_similarity = psnr(refined["ort"].array, refined["torch"].array)
    ip_similarity = psnr(prompted["ort"].array, prompted["torch"].array)
    noise_similarity = psnr(torch_noise["ort"].array, torch_noise["torch"].array)
    pag_similarity = psnr(perturbed["ort"].array, perturbed["torch"].array)
    lcm_similarity = psnr(consistent["ort"].array, consistent["torch"].array)
    taesd_similarity = psnr(tiny_decoded["ort"].array, tiny_decoded["torch"].array)
    deepcache_similarity = psnr(cached["ort"].array, cached["torch"].array)
    freeu_similarity = psnr(freed["ort"].array, freed["torch"].array)
    ays_similarity = psnr(aligned["ort"].array, aligned["torch"].array)
    apg_similarity = psnr(projected["ort"].array, projected["torch"].array)
    print(format_times({f"{b} (ms, calls)": r.times.summary() for b, r in results.items()}))
    print(
        f"\nwrote {output}: {steps} steps, "
        f"{ort_result.request.height}x{ort_result.request.width}, seed {SEED}"
    )
    print(f"ONNX Runtime image vs PyTorch (diffusers) image: PSNR {similarity:.1f} dB")
    print(f"wrote {extra_outputs['img2img']}: image to image from it, strength {IMG2IMG_STRENGTH}")
    print(f"ONNX Runtime vs PyTorch (diffusers img2img): PSNR {img2img_similarity:.1f} dB")
    print(f"wrote {extra_outputs['inpaint']}: its centre inpainted (the rest kept)")
    print(f"ONNX Runtime vs PyTorch (diffusers inpainting): PSNR {inpaint_similarity:.1f} dB")
    print(
        f"wrote {extra_outputs['edit-hires']}: {EDITED_PROMPT!r}, then the hires fix at {HIRES_SCALE:g}x "
        f"({edited['ort'].array.shape[1]}x{edited['ort'].array.shape[2]})"
    )
    print(
        "ONNX Runtime vs PyTorch (diffusers fed each step's embeddings, then its img2img): "
        f"PSNR {edit_similarity:.1f} dB"
    )
    print(f"wrote {extra_outputs['lora']}: the first prompt with a random LoRA fused at scale {LORA_SCALE}")
    print(f"ONNX Runtime vs PyTorch (diffusers fuse_lora): PSNR {lora_similarity:.1f} dB")
    print(f"wrote {extra_outputs['controlnet']}: a random ControlNet following the first image's edges")
    print(f"ONNX Runtime vs PyTorch (diffusers ControlNet pipeline): PSNR {control_similarity:.1f} dB")
    print(f"wrote {extra_outputs['sdxl']}: {XL_PROMPT!r} from the tiny SDXL model")
    print(f"ONNX Runtime vs PyTorch (diffusers SDXL pipeline): PSNR {xl_similarity:.1f} dB")
    print(f"wrote {extra_outputs['sdxl-refined']}: the same with the refiner from the switch on")
    print(
        "ONNX Runtime vs PyTorch (diffusers SDXL pipeline to denoising_end, then its refiner from "
        f"denoising_start): PSNR {refined_similarity:.1f} dB"
    )
    print(f"wrote {extra_outputs['ip-adapter']}: {IP_PROMPT!r} with the first image as an image prompt")
    print(f"ONNX Runtime vs PyTorch (diffusers load_ip_adapter): PSNR {ip_similarity:.1f} dB")
    print(
        f"wrote {extra_outputs['torch-noise']}: the first prompt, its noise as PyTorch's CPU generator "
        "draws it"
    )
    print(
        "ONNX Runtime vs PyTorch (diffusers drawing its own noise from torch.Generator('cpu'), nothing "
        f"handed over): PSNR {noise_similarity:.1f} dB"
    )
    print(f"wrote {extra_outputs['pag']}: the first prompt with perturbed-attention guidance")
    print(f"ONNX Runtime vs PyTorch (diffusers PAG pipeline): PSNR {pag_similarity:.1f} dB")
    print(
        f"wrote {extra_outputs['lcm']}: the first prompt from a latent consistency model in "
        f"{LCM_SETTINGS['steps']} steps"
    )
    print(
        f"ONNX Runtime vs PyTorch (diffusers pipeline, its guidance embedding): PSNR {lcm_similarity:.1f} dB"
    )
    print(f"wrote {extra_outputs['taesd']}: the first prompt decoded by a random tiny VAE")
    print(f"ONNX Runtime vs PyTorch (diffusers with AutoencoderTiny): PSNR {taesd_similarity:.1f} dB")
    print(
        f"wrote {extra_outputs['deepcache']}: the first prompt with DeepCache at interval "
        f"{DEEPCACHE_INTERVAL} (its speed-up: benchmarks/README.md; this tiny UNet's calls are too short to "
        "show one)"
    )
    print(f"ONNX Runtime vs PyTorch (diffusers with DeepCacheSDHelper): PSNR {deepcache_similarity:.1f} dB")
    print(f"wrote {extra_outputs['freeu']}: the first prompt with FreeU")
    print(f"ONNX Runtime vs PyTorch (diffusers enable_freeu): PSNR {freeu_similarity:.1f} dB")
    print(f"wrote {extra_outputs['ays']}: the first prompt (with the LoRA) in Align Your Steps' 10 steps")
    print(f"ONNX Runtime vs PyTorch (diffusers given timesteps=): PSNR {ays_similarity:.1f} dB")
    print(f"wrote {extra_outputs['apg']}: the first prompt (with the LoRA) with adaptive projected guidance")
    print(f"ONNX Runtime vs PyTorch (diffusers' normalized_guidance): PSNR {apg_similarity:.1f} dB")
    print(
        "NOTE: the checkpoint's weights are RANDOM, so the image is structured noise, "
        "not a picture of the prompt."
    )
    return {
        "psnr_db": similarity,
        "img2img_psnr_db": img2img_similarity,
        "inpaint_psnr_db": inpaint_similarity,
        "edit_hires_psnr_db": edit_similarity,
        "lora_psnr_db": lora_similarity,
        "controlnet_psnr_db": control_similarity,
        "sdxl_psnr_db": xl_similarity,
        "sdxl_refined_psnr_db": refined_similarity,
        "ip_adapter_psnr_db": ip_similarity,
        "torch_noise_psnr_db": noise_similarity,
        "pag_psnr_db": pag_similarity,
        "lcm_psnr_db": lcm_similarity,
        "taesd_psnr_db": taesd_similarity,
        "deepcache_psnr_db": deepcache_similarity,
        "freeu_psnr_db": freeu_similarity,
        "ays_psnr_db": ays_similarity,
        "apg_psnr_db": apg_similarity,
    }
