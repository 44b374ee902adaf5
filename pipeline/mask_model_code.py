"""The model-from-code file of a mask-stored variant (``mlflow.pyfunc.log_model(python_model=<this file>)``):
MLflow copies it into the logged model and runs it on load, so nothing is unpickled. Needs dlp-pipeline
installed where the model is loaded (:mod:`pipeline.mask_model`)."""

from mlflow.models import set_model

from pipeline.mask_model import MaskStoredModel

set_model(MaskStoredModel())
