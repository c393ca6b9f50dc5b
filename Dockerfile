# One image for all three services; docker-compose.yml picks the module to run.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app:/app/gen

COPY pyproject.toml ./
RUN pip install --no-cache-dir .

COPY protos ./protos
RUN mkdir gen && python -m grpc_tools.protoc -I protos --python_out=gen --grpc_python_out=gen \
        $(find protos -name '*.proto')

COPY shared ./shared
COPY services ./services

USER nobody
# Overridden per service in docker-compose.yml.
CMD ["python", "-m", "services.story.main"]
