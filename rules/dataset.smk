# Stage 1: dataset index (adapters; the synthetic generator writes its pages under generated/).
# The manifest param (names, sizes and mtimes of the files under root) re-runs it when a file changes.


checkpoint dataset:
    output:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        rejected=f"{RESULTS}/{{dataset}}/rejected.parquet",
        generated=directory(f"{RESULTS}/{{dataset}}/generated"),
    log:
        f"{RESULTS}/{{dataset}}/logs/dataset.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/dataset.tsv"
    conda:
        "../envs/cpu.yaml"
    threads: 8
    params:
        code=CODE["dataset"],
        settings=get_dataset_settings,
        manifest=get_dataset_manifest,
        on_bad_input=config["on_bad_input"],
    script:
        "../scripts/dataset.py"
