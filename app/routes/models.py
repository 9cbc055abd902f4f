from app.models import Model
from app.routes.files import file_router

router = file_router("models", Model)
