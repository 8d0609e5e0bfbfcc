"""The build's stages, one module each (see :mod:`reprobuild.pipeline.stage`). A stage never
imports another stage; what several share lives in :mod:`.disksettings` or below."""
