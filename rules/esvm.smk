# Stage 5b: exemplar SVMs (the esvm value of the experiments' encoding axis). Per test document a
# linear SVM with it as the only positive against the train documents (train_on's with a transfer);
# its L2-normalised weight vector is the new descriptor. One job per shard of documents
# (embarrassingly parallel), then one descriptors.parquet.


rule esvm_shard:
    input:
        descriptors=get_descriptors("esvm", "descriptors.parquet"),
        negatives=get_esvm_negatives,
    output:
        vectors=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/shards/{{shard}}.npy",
        doc_ids=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/shards/{{shard}}.parquet",
        run=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/shards/{{shard}}.run.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/esvm/{{folder}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/{{dataset}}/benchmarks/esvm/{{folder}}/{{shard}}.tsv"
    wildcard_constraints:
        folder=PLAN.folders("esvm"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["esvm"],
        settings=result_settings("esvm"),
        shard_size=config["shard_size"],
    script:
        "../scripts/esvm.py"


rule esvm:
    input:
        index=f"{RESULTS}/{{dataset}}/index.parquet",
        descriptors=get_descriptors("esvm", "descriptors.parquet"),
        vectors=shards_of("esvm", "npy"),
        doc_ids=shards_of("esvm", "parquet"),
        runs=shards_of("esvm", "run.json"),
    output:
        descriptors=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/descriptors.parquet",
        info=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/esvm.json",
        settings=f"{RESULTS}/{{dataset}}/esvm/{{folder}}/settings.json",
    log:
        f"{RESULTS}/{{dataset}}/logs/esvm/{{folder}}/merge.log",
    wildcard_constraints:
        folder=PLAN.folders("esvm"),
    conda:
        "../envs/cpu.yaml"
    params:
        code=CODE["esvm"],
        settings=result_settings("esvm"),
    script:
        "../scripts/esvm.py"
