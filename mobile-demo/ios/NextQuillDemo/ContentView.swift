// The demo's screen: users and history, a text's heatmap, "personalize now"
// with a progress bar and cancel, generic next to personalized text.
import SwiftUI

struct ContentView: View {
    @ObservedObject var model: DemoModel

    var body: some View {
        NavigationStack {
            List {
                Section { Text(model.status).font(.footnote) }
                Section("Users") {
                    Picker("User", selection: Binding(
                        get: { model.selectedUser ?? "" },
                        set: { model.select($0) })) {
                        ForEach(model.users, id: \.userId) { Text("\($0.userId) (\($0.items))").tag($0.userId) }
                    }
                    .pickerStyle(.segmented)
                }
                if !model.heatmap.isEmpty {
                    Section("What the history caused") { heatmapView }
                }
                if model.selectedUser != nil {
                    Section("Personalize") {
                        if let progress = model.progress {
                            ProgressView(value: progress)
                            Button("Cancel", role: .cancel) { model.cancel() }
                        } else {
                            Button("Personalize now") { model.personalize() }
                        }
                    }
                    Section("Generic vs personalized") {
                        Button("Write a kettle review") { model.compare() }
                        HStack(alignment: .top) {
                            VStack(alignment: .leading) { Text("Generic").bold(); Text(model.generic) }
                            VStack(alignment: .leading) { Text("Personalized").bold(); Text(model.personalized) }
                        }
                    }
                    Section("History — tap for a heatmap") {
                        ForEach(model.history, id: \.itemId) { item in
                            VStack(alignment: .leading) {
                                Text(item.request.replacingOccurrences(of: "\n", with: " · ")).font(.caption)
                                Text(item.text)
                            }
                            .onTapGesture { model.explain(item) }
                        }
                    }
                }
            }
            .navigationTitle("NextQuill")
        }
    }

    /// Tokens tinted orange where the history made them likelier, blue where less.
    private var heatmapView: some View {
        model.heatmap.reduce(Text("")) { text, cell in
            let colour: Color = cell.intensity >= 0 ? .orange : .blue
            // Preference-bearing tokens (Δp > δ) are underlined.
            let token = Text(cell.text)
                .underline(cell.preferenceBearing)
                .foregroundColor(colour.opacity(0.3 + 0.7 * Double(abs(cell.intensity))))
            return text + token
        }
    }
}
