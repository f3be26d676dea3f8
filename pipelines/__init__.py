"""Clinical pipelines, one package per task.

Each package registers itself with a ``spec.py`` holding
``SPEC = PipelineSpec(...)`` (:mod:`pipelines.spec`); :mod:`pipelines.registry`
finds them, and plug-ins of the entry-point group ``ainode.pipelines``. A
pipeline's class is imported only when a job first needs it
(:meth:`pipelines.spec.PipelineSpec.load_class`), so the node starts without
loading torch.
"""
