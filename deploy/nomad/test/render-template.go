// Renders a Nomad `template` block's data with Go's text/template, the engine consul-template
// (and so Nomad) uses, with the Nomad-variable functions our jobs call standing in for a Nomad
// cluster: nomadVarExists, nomadVar (items keyed by name, each with .Key and .Value, like
// consul-template's NomadVarItems), toUpper and toJSON.
//
// stdin: {"template": "...", "variables": {"nomad/jobs": {"bucket": "gs://b"}}}; stdout: the render.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type nomadVarItem struct {
	Key, Value string
}

func (i nomadVarItem) String() string { return i.Value }

func (i nomadVarItem) MarshalJSON() ([]byte, error) { return json.Marshal(i.Value) }

type input struct {
	Template  string                       `json:"template"`
	Variables map[string]map[string]string `json:"variables"`
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail("decode input", err)
	}
	funcs := template.FuncMap{
		"nomadVarExists": func(path string) bool {
			_, ok := in.Variables[path]
			return ok
		},
		"nomadVar": func(path string) (map[string]nomadVarItem, error) {
			items, ok := in.Variables[path]
			if !ok {
				// consul-template would block the task here until the variable exists.
				return nil, fmt.Errorf("nomadVar %q does not exist: the task would wait for it", path)
			}
			out := make(map[string]nomadVarItem, len(items))
			for k, v := range items {
				out[k] = nomadVarItem{Key: k, Value: v}
			}
			return out, nil
		},
		"toUpper": strings.ToUpper,
		"toJSON": func(v interface{}) (string, error) {
			b, err := json.Marshal(v)
			return string(b), err
		},
	}
	tmpl, err := template.New("data").Funcs(funcs).Option("missingkey=error").Parse(in.Template)
	if err != nil {
		fail("parse", err)
	}
	if err := tmpl.Execute(os.Stdout, nil); err != nil {
		fail("execute", err)
	}
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "render-template: %s: %v\n", what, err)
	os.Exit(1)
}
