"""The stages of ``cryoace reconstruct`` and the order they run in (:mod:`cryoace.pipeline.run`).

* the networks' training (:mod:`cryoace.train`: encoder + decoder, cryoAI / ACE-EM);
* the ab initio map, the refinement rounds on a bounded subset and the final pass over every
  particle, with gold-standard half sets (:mod:`cryoace.pipeline.refine_stage`, built on the classical
  methods of :mod:`cryoace.reconstruct`), and the encoder taught from the final map;
* ``--halves``: two independent half-set trainings instead (:mod:`cryoace.pipeline.halves`);
* one wall-time budget split over the stages (:mod:`cryoace.pipeline.budget`);
* the run directory: its checks, data, gold standard and report (:mod:`cryoace.pipeline.rundir`).
"""
