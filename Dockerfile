# The byzguard worker image. Build: docker build -t byzguard .   (needs a Docker engine)
# The wheel holds the `byzguard` package only; the worker (app, agents, tables, topics) runs from /srv/byzguard.
# app/dev/ (local broker tool, demo) is development-only and left out (.dockerignore): the image needs a broker.
FROM python:3.11-slim
WORKDIR /srv/byzguard
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/srv/byzguard \
    BYZGUARD_DATA_DIR=/var/lib/byzguard BYZGUARD_WEB_HOST=0.0.0.0
COPY pyproject.toml README.md constraints.txt ./
COPY byzguard ./byzguard
RUN pip install --no-cache-dir -c constraints.txt '.[worker]'
COPY app ./app
COPY topics ./topics
COPY tables ./tables
COPY agents ./agents
COPY byzguard.yaml ./byzguard.yaml
VOLUME /var/lib/byzguard
EXPOSE 6066
ENTRYPOINT ["byzguard"]
CMD ["run"]
