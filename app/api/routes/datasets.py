from app.api.routes.files import file_router
from app.core.tables import Dataset

router = file_router("datasets", Dataset)
