"""The file MLflow logs as the served model's code ("models from code"): loading the model runs it.

Logging a file instead of a pickled object keeps unpickling out of loading the model; the
package itself travels with the model (``code_paths``), so the import below works wherever
the model is loaded.
"""

from mlflow.models import set_model

from purer_mlops.serve.pyfunc import FewShotPyfunc

set_model(FewShotPyfunc())
