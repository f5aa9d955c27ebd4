# The byzguard worker image. Build: docker build -t byzguard .   (needs a Docker engine)
FROM python:3.11-slim
WORKDIR /srv/byzguard
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BYZGUARD_DATA_DIR=/var/lib/byzguard BYZGUARD_WEB_HOST=0.0.0.0
COPY pyproject.toml README.md ./
COPY byzguard ./byzguard
COPY app ./app
COPY topics ./topics
COPY tables ./tables
COPY agents ./agents
RUN pip install --no-cache-dir .
COPY byzguard.yaml ./byzguard.yaml
VOLUME /var/lib/byzguard
EXPOSE 6066
ENTRYPOINT ["byzguard"]
CMD ["run"]
