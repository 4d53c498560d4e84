"""ev MODEL.safetensors DIRS SEEDS [GUIDANCE]: sample "a {colour} square moving {d}" for every colour and
each d in DIRS (comma list), SEEDS times, with the run's own sampler; print the direction read back from
the pixels per captioned direction. DIR_ONLY=1 prompts "moving {d}" only (for direction-only captions).
"""

import collections
import os


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import trainer.synthetic_eval as se
    from model.diffusion import GaussianDiffusion
    from trainer.export import load_ema_model
    from trainer.generate import load_text_encoder

    path, dirs, seeds = argv[0], argv[1].split(","), int(argv[2])
    guidance = float(argv[3]) if len(argv) > 3 else None

    def grid(n_seeds):
        prompts = [f"a {c} square moving {d}" for _ in range(n_seeds) for c in se.COLOURS for d in dirs]
        return prompts, [i // (len(se.COLOURS) * len(dirs)) for i in range(len(prompts))]

    se.prompt_grid = grid
    if os.environ.get("DIR_ONLY"):
        import trainer.generate as generate

        encode = generate.encode_prompts
        generate.encode_prompts = lambda enc, prompts: encode(enc, [" ".join(p.split()[-2:]) for p in prompts])
    model, cfg, meta = load_ema_model(path)
    enc = load_text_encoder(meta.get("text_encoder") or cfg.run.text_encoder or "minilm", cfg.data.max_text_len)
    sc = cfg.sampling
    sampling = dict(sampler=sc.sampler, steps=cfg.run.sample_steps, gamma=sc.gamma, langevin_delta=sc.langevin_delta,
                    guidance_weight=sc.guidance_weight if guidance is None else guidance, clip_x=sc.clip_x)
    report = se.evaluate_synthetic(model, GaussianDiffusion.from_config(cfg.diffusion), enc, frames=cfg.data.num_frames,
                                   size=cfg.data.image_size, seeds=seeds, sampling=sampling)
    counts = collections.defaultdict(collections.Counter)
    for prompt, reading in zip(report.prompts, report.readings):
        counts[prompt.split()[-1]][reading.direction] += 1
    right = sum(counts[d][d] for d in counts)
    total = sum(sum(c.values()) for c in counts.values())
    print(f"direction {right}/{total} = {100 * right / total:.0f}%  colour {report.metrics.get('colour')}")
    for d in dirs:
        print(" ", d, "->", dict(counts[d]))
    return 0
