"""The build pipeline: stages that declare what they read (:mod:`.stage`), the runner that keys,
serves, runs and explains them (:mod:`.runner`), the digest of the code a stage runs
(:mod:`.codedigest`) and the context handed to every stage (:mod:`.context`)."""
