// Starts GraphiQL. Served from the gateway like everything else on the page, as a file rather
// than an inline script, so the Content-Security-Policy can forbid inline scripts.
//
// /playground/config.json says where the API is and, in dev mode only, which headers to
// pre-fill (a demo practitioner's token). Queries and mutations go over HTTP with the Headers
// pane's headers; subscriptions open a graphql-transport-ws connection to /graphql/ws, and
// GraphiQL's fetcher sends the Headers pane's headers as that connection's `connection_init`
// payload ({"Authorization": "Bearer …"}), which is where the gateway reads the token.
(function () {
  'use strict';

  var root = document.getElementById('graphiql');

  function showError(message) {
    root.textContent = '';
    var paragraph = document.createElement('p');
    paragraph.className = 'playground-error';
    paragraph.textContent = message;
    root.appendChild(paragraph);
  }

  function start(config) {
    var webSocketScheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    var fetcher = window.GraphiQL.createFetcher({
      url: config.endpoint || '/graphql',
      subscriptionUrl:
        webSocketScheme + '//' + window.location.host + (config.subscriptionPath || '/graphql/ws'),
    });
    var props = {
      fetcher: fetcher,
      defaultQuery: config.defaultQuery,
      // Each connection's token: kept out of the browser's storage.
      shouldPersistHeaders: false,
    };
    if (config.headers) {
      props.headers = JSON.stringify(config.headers, null, 2);
      props.defaultEditorToolsVisibility = 'headers';
    }
    window.ReactDOM.createRoot(root).render(window.React.createElement(window.GraphiQL, props));
  }

  if (!window.React || !window.ReactDOM || !window.GraphiQL) {
    showError('The playground could not load its scripts from this gateway.');
    return;
  }
  fetch('/playground/config.json', { headers: { accept: 'application/json' } })
    .then(function (response) {
      if (!response.ok) {
        throw new Error('the playground configuration answered ' + response.status);
      }
      return response.json();
    })
    .then(start)
    .catch(function (error) {
      showError('The playground could not start: ' + error.message);
    });
})();
