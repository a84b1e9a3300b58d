# Stage 1: dataset index (adapters; the synthetic generator writes its pages under generated/).


checkpoint dataset:
    output:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        rejected=f"{RESULTS}/{{dataset}}/rejected.parquet",
        generated=directory(f"{RESULTS}/{{dataset}}/generated"),
    params:
        code=CODE["dataset"],
        settings=lambda wc: config["datasets"][wc.dataset],
        on_bad_input=config["on_bad_input"],
    threads: 8
    log:
        f"{RESULTS}/{{dataset}}/logs/dataset.log",
    conda:
        "../envs/cpu.yaml"
    script:
        "../scripts/dataset.py"
