// Swagger UI 5 on this server's OpenAPI 3.1 document. No validator badge (it would call
// swagger.io), and "Try it out" requests carry the API key the playground stored, so the docs
// work when the server needs a key.
"use strict";

const KEY_STORAGE = "lstm-lm.api-key"; // the playground's key field writes it

window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#docs",
  validatorUrl: null,
  deepLinking: true,
  docExpansion: "list",
  defaultModelsExpandDepth: 0,
  requestInterceptor: (request) => {
    const key = window.localStorage.getItem(KEY_STORAGE);
    if (key && !request.headers.Authorization) request.headers.Authorization = `Bearer ${key}`;
    return request;
  },
});
