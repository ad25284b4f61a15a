# CPU-only image of the LSTM language-model service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8000

WORKDIR /app

# torch first, exactly pinned and from the CPU wheel index: the default index serves a
# multi-GB CUDA build this service never uses
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip install .

RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8000\")}/health', timeout=2)"

# the Procfile's web command
CMD ["sh", "-c", "exec gunicorn -c service/gunicorn.conf.py 'service:create_app()'"]
