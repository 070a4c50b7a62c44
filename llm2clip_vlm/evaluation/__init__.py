"""Evaluation of the package's LLaVA models through lmms-eval (MME, ScienceQA-IMG, VizWiz).

- ``prompt``          the conversation template a model was trained with (``llava_template.json``)
- ``lmms_model``      the lmms-eval model class ``llm2clip_llava`` (imports lmms-eval)
- ``manifest``        its ``ModelManifest``, registered through the ``lmms_eval.models`` entry point
- ``local_tasks``     task YAMLs that read local parquet copies of the three benchmarks
- ``synthetic_tasks`` small local copies built from the synthetic demo world
- ``report``          reference numbers and the comparison table
- ``run``             what ``llm2clip-vlm eval`` does

Nothing here imports lmms-eval at ``import llm2clip_vlm.evaluation`` time.
"""
