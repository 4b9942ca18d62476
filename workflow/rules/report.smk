# Report: every table and figure of results/, from the metrics, logs and samples.


rule report:
    input:
        job_inputs("report"),
    output:
        P.report_manifest_path(),
        f"{P.RESULTS}/README.md",
        [
            report(f"{P.RESULTS}/{f}", category="Figures")
            for f in P.report_figures(PARAMS)
        ],
    params:
        block=job_params("report"),
        cmd=job_cmd("report"),
        overlays=OVERLAYS,
    conda:
        DOD_ENV
    log:
        "logs/report.log",
    shell:
        "{params.cmd}{params.overlays} > {log} 2>&1"
