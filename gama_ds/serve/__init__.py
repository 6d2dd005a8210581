"""`gama-ds serve`: an export behind an OpenAI-compatible chat API and a web page.

options.py    the command's settings, every number checked before the model loads
api_errors.py OpenAI-style error bodies and the status code of each kind of bad request
chat.py       the request schema (pydantic) and its reading into one question about one clip
clips.py      a request's audio -> features, through the training front end (gama_ds.audio)
streamer.py   per-row token streaming and stopping inside one batched `generate`
batcher.py    the queue, dynamic batching and the one generation thread
app.py        the FastAPI routes: /v1/chat/completions, /v1/models, /metrics, the page
static/       the web page (upload or record, ask, answer, spectrogram)
"""
