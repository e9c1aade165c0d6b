"""Mixed-precision planning: plans and the HiGHS integer program (:mod:`.bitplan`), sensitivity
estimators (:mod:`.sensitivity`), plan refinement (:mod:`.refine`), backend latency tables (:mod:`.latency`)."""
