"""fluxrt as a service: an HTTP API over one model worker (`fluxrt serve`, docs/SERVICE.md).

Modules: `app` (create_app(config) -> FastAPI: OpenAI-compatible and native routes), `config` (ServiceConfig,
tokens), `jobs` (admission, data dir, signed URLs), `store` (SQLite job store), `worker` (the model thread,
batching, cancellation, timeouts, safety), `api` (parsing and JSON), `images` (upload checks), `preview`
(latent previews), `metrics` (Prometheus), `remote` (prompt embeddings over HTTP: RemoteTextEncoder), `cli`
(the `serve` subcommand). FastAPI and uvicorn come with the `serve` extra and are imported only by `app` and `cli`;
`remote` needs neither, so a client machine can use RemoteTextEncoder without them.
"""
